//! Data-loss detectors: payment card numbers (Luhn), IBANs (ISO 13616
//! mod-97) and configured regexes, each counting its matches in a window of
//! decoded text. Parts are scanned a window at a time so a 25 MB attachment
//! never has to be in memory; [`count_in_ranges`] makes the windows overlap
//! and counts each match once.

/// What a data-loss rule looks for.
#[derive(Debug, Clone)]
pub enum Detector {
    /// Payment card numbers: 13 to 19 digits (spaces or dashes between
    /// them allowed), a card network's prefix, and a valid Luhn check digit.
    Cards,
    /// IBANs: a known country's length and a valid mod-97 checksum.
    Iban,
    /// Matches of a configured pattern.
    Pattern(regex::bytes::Regex),
}

impl Detector {
    /// Start offsets of the matches in `text`.
    pub fn find(&self, text: &[u8]) -> Vec<usize> {
        match self {
            Detector::Cards => cards(text),
            Detector::Iban => ibans(text),
            Detector::Pattern(re) => re.find_iter(text).map(|m| m.start()).collect(),
        }
    }
}

/// The Luhn check (ISO/IEC 7812-1) over ASCII digits.
pub fn luhn(digits: &[u8]) -> bool {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Whether a card network issues numbers of this prefix and length: Visa,
/// Mastercard, American Express, Discover, JCB, Diners Club, UnionPay,
/// Maestro. An order number that happens to pass the Luhn check (one in
/// ten does) rarely has both.
fn issued(digits: &[u8]) -> bool {
    let len = digits.len();
    let prefix = |n: usize| -> u32 {
        digits[..n.min(len)]
            .iter()
            .fold(0, |acc, d| acc * 10 + u32::from(d - b'0'))
    };
    match digits[0] {
        b'4' => matches!(len, 13 | 16 | 19),
        b'2' => (2221..=2720).contains(&prefix(4)) && len == 16,
        b'5' => {
            let p2 = prefix(2);
            ((51..=55).contains(&p2) && len == 16)
                || ((p2 == 50 || (56..=58).contains(&p2)) && len >= 12)
        }
        b'3' => {
            let p2 = prefix(2);
            ((p2 == 34 || p2 == 37) && len == 15)
                || ((3528..=3589).contains(&prefix(4)) && (16..=19).contains(&len))
                || ((p2 == 36 || p2 == 38 || (300..=305).contains(&prefix(3)))
                    && (14..=19).contains(&len))
        }
        b'6' => (16..=19).contains(&len),
        _ => false,
    }
}

/// Start offsets of card numbers in `text`. A number is 13 to 19 digits,
/// optionally in groups separated by single spaces or dashes, not touching
/// other letters or digits.
pub fn cards(text: &[u8]) -> Vec<usize> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < text.len() {
        if !text[i].is_ascii_digit() || (i > 0 && text[i - 1].is_ascii_alphanumeric()) {
            i += 1;
            continue;
        }
        let start = i;
        let mut digits = Vec::with_capacity(19);
        let mut j = i;
        let mut separator: Option<u8> = None;
        while j < text.len() && digits.len() <= 19 {
            let b = text[j];
            if b.is_ascii_digit() {
                digits.push(b);
                j += 1;
            } else if (b == b' ' || b == b'-')
                && j + 1 < text.len()
                && text[j + 1].is_ascii_digit()
                && separator.is_none_or(|s| s == b)
            {
                separator = Some(b);
                j += 1;
            } else {
                break;
            }
        }
        let touching = j < text.len() && text[j].is_ascii_alphanumeric();
        if (13..=19).contains(&digits.len()) && !touching && issued(&digits) && luhn(&digits) {
            found.push(start);
        }
        i = j.max(i + 1);
    }
    found
}

/// IBAN lengths by country (the SWIFT IBAN registry).
const IBAN_LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24),
    (b"AE", 23),
    (b"AL", 28),
    (b"AT", 20),
    (b"AZ", 28),
    (b"BA", 20),
    (b"BE", 16),
    (b"BG", 22),
    (b"BH", 22),
    (b"BR", 29),
    (b"BY", 28),
    (b"CH", 21),
    (b"CR", 22),
    (b"CY", 28),
    (b"CZ", 24),
    (b"DE", 22),
    (b"DK", 18),
    (b"DO", 28),
    (b"EE", 20),
    (b"EG", 29),
    (b"ES", 24),
    (b"FI", 18),
    (b"FO", 18),
    (b"FR", 27),
    (b"GB", 22),
    (b"GE", 22),
    (b"GI", 23),
    (b"GL", 18),
    (b"GR", 27),
    (b"GT", 28),
    (b"HR", 21),
    (b"HU", 28),
    (b"IE", 22),
    (b"IL", 23),
    (b"IQ", 23),
    (b"IS", 26),
    (b"IT", 27),
    (b"JO", 30),
    (b"KW", 30),
    (b"KZ", 20),
    (b"LB", 28),
    (b"LC", 32),
    (b"LI", 21),
    (b"LT", 20),
    (b"LU", 20),
    (b"LV", 21),
    (b"MC", 27),
    (b"MD", 24),
    (b"ME", 22),
    (b"MK", 19),
    (b"MR", 27),
    (b"MT", 31),
    (b"MU", 30),
    (b"NL", 18),
    (b"NO", 15),
    (b"PK", 24),
    (b"PL", 28),
    (b"PS", 29),
    (b"PT", 25),
    (b"QA", 29),
    (b"RO", 24),
    (b"RS", 22),
    (b"SA", 24),
    (b"SC", 31),
    (b"SE", 24),
    (b"SI", 19),
    (b"SK", 24),
    (b"SM", 27),
    (b"ST", 25),
    (b"SV", 28),
    (b"TL", 23),
    (b"TN", 24),
    (b"TR", 26),
    (b"UA", 29),
    (b"VA", 22),
    (b"VG", 24),
    (b"XK", 20),
];

/// The ISO 13616 check: the first four characters moved to the end,
/// letters as 10..35, the number mod 97 is 1.
pub fn iban_valid(iban: &[u8]) -> bool {
    if iban.len() < 5 || !iban.iter().all(u8::is_ascii_alphanumeric) {
        return false;
    }
    let Some(&(_, len)) = IBAN_LENGTHS.iter().find(|(c, _)| &iban[..2] == *c) else {
        return false;
    };
    if iban.len() != len || !iban[2..4].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let mut rem: u32 = 0;
    for &c in iban[4..].iter().chain(&iban[..4]) {
        let c = c.to_ascii_uppercase();
        if c.is_ascii_digit() {
            rem = (rem * 10 + u32::from(c - b'0')) % 97;
        } else {
            rem = (rem * 100 + u32::from(c - b'A' + 10)) % 97;
        }
    }
    rem == 1
}

/// Start offsets of IBANs in `text`: a country code in capitals, two check
/// digits, then the country's length in letters and digits, in groups of
/// four separated by single spaces or not at all.
pub fn ibans(text: &[u8]) -> Vec<usize> {
    let mut found = Vec::new();
    let mut i = 0;
    while i + 4 <= text.len() {
        let boundary = i == 0 || !text[i - 1].is_ascii_alphanumeric();
        let head = &text[i..i + 4];
        if !boundary
            || !head[..2].iter().all(u8::is_ascii_uppercase)
            || !head[2..].iter().all(u8::is_ascii_digit)
        {
            i += 1;
            continue;
        }
        let Some(&(_, len)) = IBAN_LENGTHS.iter().find(|(c, _)| &head[..2] == *c) else {
            i += 1;
            continue;
        };
        let mut compact = Vec::with_capacity(len);
        let mut j = i;
        while j < text.len() && compact.len() < len {
            let b = text[j];
            if b.is_ascii_alphanumeric() {
                compact.push(b);
                j += 1;
            } else if b == b' '
                && compact.len() % 4 == 0
                && j + 1 < text.len()
                && text[j + 1].is_ascii_alphanumeric()
            {
                j += 1;
            } else {
                break;
            }
        }
        let touching = j < text.len() && text[j].is_ascii_alphanumeric();
        if compact.len() == len && !touching && iban_valid(&compact) {
            found.push(i);
            i = j;
        } else {
            i += 1;
        }
    }
    found
}

/// Bytes read at a time.
pub const WINDOW: u64 = 64 * 1024;
/// Context read on each side of a window, so a match that crosses a window
/// edge (or needs the character before it) is seen whole. Longer matches
/// than this may be missed.
pub const MARGIN: u64 = 1024;

/// Counts the matches of each detector in content of `size` bytes, read by
/// `read(offset, len)` a window at a time. A match is counted in the window
/// where it starts.
pub fn count_in_ranges(
    size: u64,
    detectors: &[&Detector],
    mut read: impl FnMut(u64, u32) -> Vec<u8>,
) -> Vec<u32> {
    let mut counts = vec![0u32; detectors.len()];
    let mut start = 0u64;
    while start < size {
        let lo = start.saturating_sub(MARGIN);
        let hi = size.min(start + WINDOW + MARGIN);
        let mut buf = Vec::with_capacity((hi - lo) as usize);
        while (buf.len() as u64) < hi - lo {
            let at = lo + buf.len() as u64;
            let chunk = read(at, (hi - at) as u32);
            if chunk.is_empty() {
                break;
            }
            buf.extend_from_slice(&chunk);
        }
        for (n, d) in detectors.iter().enumerate() {
            let hits = d
                .find(&buf)
                .into_iter()
                .map(|s| lo + s as u64)
                .filter(|&s| s >= start && s < start + WINDOW)
                .count();
            counts[n] = counts[n].saturating_add(hits as u32);
        }
        if (buf.len() as u64) < hi - lo {
            break;
        }
        start += WINDOW;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_on_valid_invalid_and_look_alike_numbers() {
        for (number, valid) in [
            ("4111111111111111", true),  // Visa test number
            ("5555555555554444", true),  // Mastercard test number
            ("378282246310005", true),   // American Express test number
            ("6011111111111117", true),  // Discover test number
            ("4111111111111112", false), // last digit changed
            ("4111111111111121", false), // two digits swapped
            ("79927398713", true),       // the textbook example
            ("79927398710", false),
            ("0000000000000000", true), // passes Luhn: `issued` refuses it
            ("", false),
            ("4111x11111111111", false),
        ] {
            assert_eq!(luhn(number.as_bytes()), valid, "{number}");
        }
    }

    #[test]
    fn card_numbers_in_text() {
        for (text, count) in [
            ("card 4111111111111111 exp 12/29", 1),
            ("card 4111 1111 1111 1111.", 1),
            ("card 4111-1111-1111-1111!", 1),
            ("amex 3782 822463 10005 and visa 4012888888881881", 2),
            ("mc 2223003122003222", 1),
            // Look-alikes.
            ("card 4111111111111112", 0),  // fails Luhn
            ("order 0000000000000000", 0), // no network
            ("ref 41111111111111110", 0),  // 17 digits, fails Luhn
            ("phone +44 20 7946 0958 1234", 0),
            ("id A4111111111111111", 0),     // part of a word
            ("4111111111111111234567", 0),   // too long
            ("card 4111-1111 1111-1111", 0), // mixed separators stop the run
            ("tracking 1Z999AA10123456784", 0),
        ] {
            assert_eq!(cards(text.as_bytes()).len(), count, "{text}");
        }
    }

    #[test]
    fn iban_checksum_on_valid_invalid_and_look_alike_numbers() {
        for (iban, valid) in [
            ("GB82WEST12345698765432", true),
            ("DE89370400440532013000", true),
            ("FR1420041010050500013M02606", true),
            ("NL91ABNA0417164300", true),
            ("BE68539007547034", true),
            ("GB82WEST12345698765433", false), // one digit off
            ("GB28WEST12345698765432", false), // check digits swapped
            ("DE8937040044053201300", false),  // one short
            ("ZZ89370400440532013000", false), // no such country
            ("gb82west12345698765432", false), // country code in lowercase
        ] {
            assert_eq!(iban_valid(iban.as_bytes()), valid, "{iban}");
        }
        for (text, count) in [
            ("pay to GB82 WEST 1234 5698 7654 32 today", 1),
            ("IBAN: DE89370400440532013000, BIC COBADEFFXXX", 1),
            ("two: NL91ABNA0417164300 BE68539007547034", 2),
            ("GB82 WEST 1234 5698 7654 33", 0),
            ("XGB82WEST12345698765432", 0),
            ("DE8937040044053201300012", 0), // runs on
        ] {
            assert_eq!(ibans(text.as_bytes()).len(), count, "{text}");
        }
    }

    #[test]
    fn windows_count_each_match_once_also_across_edges() {
        let card = b"4111 1111 1111 1111";
        // Matches placed right at, before and across window edges.
        let mut text = vec![b'.'; 3 * WINDOW as usize];
        let places = [
            0usize,
            WINDOW as usize - 10,
            WINDOW as usize + 20,
            2 * WINDOW as usize - 1,
            3 * WINDOW as usize - card.len(),
        ];
        for p in places {
            text[p..p + card.len()].copy_from_slice(card);
        }
        let d = Detector::Cards;
        let reads = std::cell::Cell::new(0);
        let counts = count_in_ranges(text.len() as u64, &[&d], |at, len| {
            reads.set(reads.get() + 1);
            // Return less than asked, as a host may.
            let end = (at as usize + len as usize)
                .min(text.len())
                .min(at as usize + 10_000);
            text[at as usize..end].to_vec()
        });
        assert_eq!(counts, vec![places.len() as u32]);
        assert!(reads.get() > 3);
    }
}
