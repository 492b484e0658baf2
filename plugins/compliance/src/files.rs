//! What an attachment is: its file name's extensions, the signature of its
//! first bytes, and for a zip archive the names, flags and signatures of
//! its entries (read through a seekable reader, so only the central
//! directory and the first bytes of each entry are read).

use std::io::{Read, Seek, SeekFrom};

/// Kinds of content recognised by their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Windows executable (MZ header with a PE signature).
    Pe,
    /// ELF executable or library.
    Elf,
    /// Mach-O executable (thin or fat).
    MachO,
    /// A script with a `#!` line.
    Script,
    /// An Office document with VBA macros (OOXML or the older OLE2 format).
    OfficeMacro,
    /// A zip archive (Office documents without macros included).
    Zip,
    /// Anything else.
    Other,
}

impl Kind {
    /// The name rules use for this kind.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pe => "pe",
            Kind::Elf => "elf",
            Kind::MachO => "macho",
            Kind::Script => "script",
            Kind::OfficeMacro => "office-macro",
            Kind::Zip => "zip",
            Kind::Other => "other",
        }
    }

    /// The kind named `name` (as in a rule's `signatures`).
    pub fn parse(name: &str) -> Option<Kind> {
        [
            Kind::Pe,
            Kind::Elf,
            Kind::MachO,
            Kind::Script,
            Kind::OfficeMacro,
            Kind::Zip,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }
}

/// Bytes of the head of content that [`sniff`] looks at.
pub const HEAD: usize = 4096;

const OLE2: &[u8] = &[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1];

/// The kind of content from its first bytes (up to [`HEAD`]). Zip and
/// OLE2 heads need a closer look ([`list_zip`], [`ole_has_macros`]) to tell
/// an Office document with macros; this answers `Zip` and `Other` for them.
pub fn sniff(head: &[u8]) -> Kind {
    let u32_at = |at: usize, big: bool| -> Option<u32> {
        let b: [u8; 4] = head.get(at..at + 4)?.try_into().ok()?;
        Some(if big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    };
    // DOS and PE executables alike start with MZ; the PE header's offset
    // at 0x3c is small in every real one, and four letters of a text that
    // happens to start with "MZ" make it huge. Too short to tell: a program.
    if head.starts_with(b"MZ") {
        let far = u32_at(0x3c, false).is_some_and(|at| at >= 0x1_0000);
        if !far {
            return Kind::Pe;
        }
    }
    if head.starts_with(b"\x7fELF") {
        return Kind::Elf;
    }
    match u32_at(0, true) {
        Some(0xFEED_FACE | 0xFEED_FACF | 0xCEFA_EDFE | 0xCFFA_EDFE) => return Kind::MachO,
        // Fat binaries share their magic with Java class files, whose next
        // word (the version) is far above any architecture count.
        Some(0xCAFE_BABE) if u32_at(4, true).is_some_and(|n| (1..20).contains(&n)) => {
            return Kind::MachO
        }
        _ => {}
    }
    if head.starts_with(b"#!") {
        return Kind::Script;
    }
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Kind::Zip;
    }
    Kind::Other
}

/// True for OLE2 compound files (the older Office formats).
pub fn is_ole2(head: &[u8]) -> bool {
    head.starts_with(OLE2)
}

/// Whether an OLE2 file has a VBA project: its directory names a
/// `_VBA_PROJECT` stream (names are UTF-16LE). Reads the file in windows.
pub fn ole_has_macros(size: u64, mut read: impl FnMut(u64, u32) -> Vec<u8>) -> bool {
    let needle: Vec<u8> = "_VBA_PROJECT"
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    let mut at = 0u64;
    let mut carry: Vec<u8> = Vec::new();
    while at < size {
        let chunk = read(at, 64 * 1024);
        if chunk.is_empty() {
            break;
        }
        at += chunk.len() as u64;
        carry.extend_from_slice(&chunk);
        if carry.windows(needle.len()).any(|w| w == needle.as_slice()) {
            return true;
        }
        let keep = carry.len().saturating_sub(needle.len());
        carry.drain(..keep);
    }
    false
}

/// File name extensions that executables and scripts use on Windows, macOS
/// and Linux: what `"executables"` in a rule's `extensions` stands for.
pub const EXECUTABLE_EXTENSIONS: &[&str] = &[
    "exe", "com", "scr", "pif", "bat", "cmd", "cpl", "dll", "msi", "msp", "jar", "js", "jse",
    "vbs", "vbe", "wsf", "wsh", "hta", "ps1", "psm1", "lnk", "reg", "sh", "app", "apk", "iso",
    "img",
];

/// Extensions of documents and pictures that a double extension hides
/// behind (`invoice.pdf.exe`).
const DOCUMENT_EXTENSIONS: &[&str] = &[
    "pdf", "doc", "docx", "xls", "xlsx", "ppt", "pptx", "txt", "rtf", "jpg", "jpeg", "png", "gif",
    "csv", "odt", "html", "htm", "zip",
];

/// The extensions of a file name, last first, lowercase; trailing dots and
/// spaces (which Windows ignores) are dropped first.
pub fn extensions(name: &str) -> Vec<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let base = base.trim_end_matches(['.', ' ']);
    let mut parts: Vec<&str> = base.split('.').collect();
    if parts.len() < 2 {
        return Vec::new();
    }
    parts.remove(0);
    parts
        .into_iter()
        .rev()
        .map(|e| e.trim().to_ascii_lowercase())
        .collect()
}

/// True when the name has a document's extension followed by another one
/// (`invoice.pdf.exe`, `photo.JPG .scr`): the usual disguise of an
/// executable.
pub fn double_extension(name: &str) -> bool {
    let ext = extensions(name);
    ext.len() >= 2
        && ext[0] != ext[1]
        && DOCUMENT_EXTENSIONS.contains(&ext[1].as_str())
        && !DOCUMENT_EXTENSIONS.contains(&ext[0].as_str())
}

/// One entry of a zip archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its path inside the archive.
    pub name: String,
    /// Encrypted (its content cannot be checked).
    pub encrypted: bool,
    /// Uncompressed size.
    pub size: u64,
    /// The kind of its content; `Other` when it could not be read.
    pub kind: Kind,
}

/// Why a zip could not be listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipError(pub String);

/// At most this many entries are looked into (their names are all listed).
const MAX_SNIFFED: usize = 1000;

/// Lists a zip archive read through `reader`: every entry's name, flags
/// and size, and the kind of the first bytes of the entries that are not
/// encrypted. An Office document with `vbaProject.bin` is reported by
/// [`has_vba_project`].
pub fn list_zip<R: Read + Seek>(reader: R) -> Result<Vec<Entry>, ZipError> {
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| ZipError(e.to_string()))?;
    let mut out = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let (name, encrypted, size) = {
            let e = zip.by_index_data(i).map_err(|e| ZipError(e.to_string()))?;
            let name = e
                .name()
                .map(|n| n.into_owned())
                .unwrap_or_else(|_| String::from_utf8_lossy(e.name_raw()).into_owned());
            (name, e.encrypted(), e.size())
        };
        let mut kind = Kind::Other;
        if !encrypted && i < MAX_SNIFFED && !name.ends_with('/') {
            if let Ok(file) = zip.by_index(i) {
                let mut head = Vec::with_capacity(HEAD);
                // A method it cannot inflate reads as an error: kind unknown.
                if file.take(HEAD as u64).read_to_end(&mut head).is_ok() {
                    kind = sniff(&head);
                }
            }
        }
        out.push(Entry {
            name,
            encrypted,
            size,
            kind,
        });
    }
    Ok(out)
}

/// True when the entries are those of an Office document with macros.
pub fn has_vba_project(entries: &[Entry]) -> bool {
    entries
        .iter()
        .any(|e| e.name.to_ascii_lowercase().ends_with("vbaproject.bin"))
}

/// A [`Read`] + [`Seek`] over content of known size read by ranges.
pub struct RangeReader<F: FnMut(u64, u32) -> Vec<u8>> {
    read: F,
    size: u64,
    pos: u64,
}

impl<F: FnMut(u64, u32) -> Vec<u8>> RangeReader<F> {
    /// A reader over `size` bytes that `read(offset, len)` returns.
    pub fn new(size: u64, read: F) -> Self {
        RangeReader { read, size, pos: 0 }
    }
}

impl<F: FnMut(u64, u32) -> Vec<u8>> Read for RangeReader<F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX).min(64 * 1024);
        let chunk = (self.read)(self.pos, len);
        let n = chunk.len().min(buf.len());
        buf[..n].copy_from_slice(&chunk[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl<F: FnMut(u64, u32) -> Vec<u8>> Seek for RangeReader<F> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(t) => {
                self.pos = t;
                Ok(t)
            }
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal PE file: DOS header pointing at a PE signature.
    fn pe() -> Vec<u8> {
        let mut f = vec![0u8; 0x100];
        f[..2].copy_from_slice(b"MZ");
        f[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        f[0x80..0x84].copy_from_slice(b"PE\0\0");
        f
    }

    #[test]
    fn signatures_of_real_file_headers() {
        let ole_doc = {
            let mut f = OLE2.to_vec();
            f.resize(512, 0);
            f
        };
        for (name, head, kind) in [
            ("pe", pe(), Kind::Pe),
            ("dos stub", b"MZ\x90\x00\x03\x00".to_vec(), Kind::Pe),
            ("elf", b"\x7fELF\x02\x01\x01\x00\x00\x00".to_vec(), Kind::Elf),
            ("mach-o 64", vec![0xCF, 0xFA, 0xED, 0xFE, 7, 0, 0, 1], Kind::MachO),
            ("mach-o 32 be", vec![0xFE, 0xED, 0xFA, 0xCE, 0, 0, 0, 7], Kind::MachO),
            ("fat", vec![0xCA, 0xFE, 0xBA, 0xBE, 0, 0, 0, 2], Kind::MachO),
            ("java class", vec![0xCA, 0xFE, 0xBA, 0xBE, 0, 0, 0, 52], Kind::Other),
            ("shell", b"#!/bin/sh\nrm -rf ~\n".to_vec(), Kind::Script),
            ("python", b"#!/usr/bin/env python3\n".to_vec(), Kind::Script),
            ("zip", b"PK\x03\x04\x14\x00".to_vec(), Kind::Zip),
            ("pdf", b"%PDF-1.7\n".to_vec(), Kind::Other),
            ("png", b"\x89PNG\r\n\x1a\n".to_vec(), Kind::Other),
            ("ole2", ole_doc, Kind::Other),
            (
                "text",
                b"MZ is how this text starts, and it goes on in letters for long enough to fill a DOS header".to_vec(),
                Kind::Other,
            ),
            ("empty", Vec::new(), Kind::Other),
        ] {
            assert_eq!(sniff(&head), kind, "{name}");
        }
        assert!(is_ole2(&[OLE2, b"rest"].concat()));
        assert!(!is_ole2(b"PK\x03\x04"));
    }

    #[test]
    fn ole2_macros_found_across_reads() {
        let name: Vec<u8> = "_VBA_PROJECT"
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        let mut file = OLE2.to_vec();
        file.resize(64 * 1024 - 7, 0);
        file.extend_from_slice(&name);
        file.resize(200_000, 0);
        let read = |f: &[u8], at: u64, len: u32| {
            let at = at as usize;
            f[at..(at + len as usize).min(f.len())].to_vec()
        };
        assert!(ole_has_macros(file.len() as u64, |a, l| read(&file, a, l)));
        let clean = [OLE2, &[0u8; 100_000][..]].concat();
        assert!(!ole_has_macros(clean.len() as u64, |a, l| read(
            &clean, a, l
        )));
    }

    #[test]
    fn extensions_case_and_doubles() {
        for (name, last, double) in [
            ("invoice.pdf", Some("pdf"), false),
            ("INVOICE.PDF.EXE", Some("exe"), true),
            ("invoice.pdf.exe.", Some("exe"), true),
            ("photo.jpg .scr", Some("scr"), true),
            ("setup.exe", Some("exe"), false),
            ("archive.tar.gz", Some("gz"), false),
            ("report.2024.pdf", Some("pdf"), false),
            ("notes.txt.pdf", Some("pdf"), false),
            ("C:\\Users\\a\\evil.doc.js", Some("js"), true),
            ("README", None, false),
        ] {
            assert_eq!(extensions(name).first().map(String::as_str), last, "{name}");
            assert_eq!(double_extension(name), double, "{name}");
        }
    }

    /// A zip built here, by hand, as the format says (APPNOTE 4.3): local
    /// headers, central directory, end record. Stored entries; the flag
    /// bit 0 marks one as encrypted.
    pub fn build_zip(entries: &[(&str, &[u8], bool)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data, encrypted) in entries {
            let offset = out.len() as u32;
            let crc = crc32(data);
            let flags: u16 = u16::from(*encrypted);
            let local = |sig: u32| {
                let mut h = Vec::new();
                h.extend_from_slice(&sig.to_le_bytes());
                h
            };
            let mut h = local(0x0403_4b50);
            h.extend_from_slice(&20u16.to_le_bytes()); // version needed
            h.extend_from_slice(&flags.to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes()); // stored
            h.extend_from_slice(&[0, 0, 0x21, 0]); // time, date
            h.extend_from_slice(&crc.to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            h.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&h);
            out.extend_from_slice(data);
            let mut c = local(0x0201_4b50);
            c.extend_from_slice(&20u16.to_le_bytes()); // made by
            c.extend_from_slice(&20u16.to_le_bytes());
            c.extend_from_slice(&flags.to_le_bytes());
            c.extend_from_slice(&0u16.to_le_bytes());
            c.extend_from_slice(&[0, 0, 0x21, 0]);
            c.extend_from_slice(&crc.to_le_bytes());
            c.extend_from_slice(&(data.len() as u32).to_le_bytes());
            c.extend_from_slice(&(data.len() as u32).to_le_bytes());
            c.extend_from_slice(&(name.len() as u16).to_le_bytes());
            c.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attrs
            c.extend_from_slice(&0u32.to_le_bytes()); // external attrs
            c.extend_from_slice(&offset.to_le_bytes());
            c.extend_from_slice(name.as_bytes());
            central.extend_from_slice(&c);
        }
        let cd_offset = out.len() as u32;
        out.extend_from_slice(&central);
        out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(central.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn zip_listing_of_a_zip_built_here() {
        let zip = build_zip(&[
            ("docs/readme.txt", b"hello", false),
            ("docs/invoice.pdf.exe", &pe(), false),
            ("tools/run.sh", b"#!/bin/sh\necho hi\n", false),
            ("secret.bin", b"\x00\x01garbage", true),
        ]);
        let reads = std::cell::Cell::new(0usize);
        let reader = RangeReader::new(zip.len() as u64, |at, len| {
            reads.set(reads.get() + 1);
            let at = at as usize;
            // Short reads, as over the host.
            zip[at.min(zip.len())..(at + len as usize).min(zip.len()).min(at + 100)].to_vec()
        });
        let entries = list_zip(reader).unwrap();
        let got: Vec<(&str, bool, Kind)> = entries
            .iter()
            .map(|e| (e.name.as_str(), e.encrypted, e.kind))
            .collect();
        assert_eq!(
            got,
            vec![
                ("docs/readme.txt", false, Kind::Other),
                ("docs/invoice.pdf.exe", false, Kind::Pe),
                ("tools/run.sh", false, Kind::Script),
                ("secret.bin", true, Kind::Other),
            ]
        );
        assert_eq!(entries[1].size, 0x100);
        assert!(!has_vba_project(&entries));
        let docm = build_zip(&[
            ("[Content_Types].xml", b"<Types/>", false),
            ("word/vbaProject.bin", &[OLE2, b"x"].concat(), false),
        ]);
        let entries = list_zip(std::io::Cursor::new(docm)).unwrap();
        assert!(has_vba_project(&entries));
        assert!(list_zip(std::io::Cursor::new(b"PK\x03\x04 not really".to_vec())).is_err());
    }
}
