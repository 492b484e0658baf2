//! Archive retention: the relay, not the plugin, removes archived files
//! older than `[plugins] archive_retention`, so an archive plugin needs no
//! timer (plugins have no clock to wake them). Every `archive_sweep` it
//! walks `<archive_dir>/<plugin>/...`, removes regular files whose last
//! change is older than the retention, then the folders (the dated ones an
//! archive plugin makes) left empty; the plugins' own folders stay, since
//! they are preopened as `/archive`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Files.
    pub files: u64,
    /// Folders left empty.
    pub folders: u64,
}

/// Removes what is older than `retention` at `now` below `root` (the
/// archive folder), keeping `root` and its direct subfolders.
pub fn sweep(root: &Path, retention: Duration, now: SystemTime) -> io::Result<Swept> {
    let mut swept = Swept::default();
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(swept),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            walk(&entry.path(), retention, now, &mut swept, false)?;
        }
    }
    Ok(swept)
}

/// Sweeps `dir`; returns whether it is empty afterwards. `removable`: the
/// folder itself may go when empty.
fn walk(
    dir: &Path,
    retention: Duration,
    now: SystemTime,
    swept: &mut Swept,
    removable: bool,
) -> io::Result<bool> {
    let mut left = 0usize;
    let mut subdirs: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            subdirs.push(entry.path());
            continue;
        }
        // Symbolic links and the like are not the archive's: left alone.
        if !kind.is_file() {
            left += 1;
            continue;
        }
        let modified = entry.metadata()?.modified()?;
        let old = now
            .duration_since(modified)
            .is_ok_and(|age| age >= retention);
        if old {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => swept.files += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        } else {
            left += 1;
        }
    }
    for sub in subdirs {
        if !walk(&sub, retention, now, swept, true)? {
            left += 1;
        }
    }
    if left == 0 && removable {
        // A plugin writing into it right now makes this fail: it stays.
        if std::fs::remove_dir(dir).is_ok() {
            swept.folders += 1;
        }
        return Ok(true);
    }
    Ok(left == 0)
}

/// Sweeps `root` every `every`, for as long as the relay runs.
pub async fn run(root: PathBuf, retention: Duration, every: Duration) {
    loop {
        let dir = root.clone();
        let done =
            tokio::task::spawn_blocking(move || sweep(&dir, retention, SystemTime::now())).await;
        match done {
            Ok(Ok(s)) if s.files > 0 || s.folders > 0 => {
                tracing::info!(files = s.files, folders = s.folders, archive = %root.display(),
                    "archive retention: removed old files")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(archive = %root.display(), error = %e, "archive retention sweep failed")
            }
            Err(e) => tracing::warn!(error = %e, "archive retention sweep stopped"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Starts the sweep when `[plugins] archive_retention` is set.
pub fn start(config: &crate::config::Config) {
    if let Some(retention) = config.plugins.archive_retention {
        let root = config.resolve(&config.plugins.archive_dir);
        tokio::spawn(run(root, retention.0, config.plugins.archive_sweep.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_files_and_empty_dated_folders_go() {
        let root = tempfile::tempdir().unwrap();
        let plugin = root.path().join("archive");
        let old_day = plugin.join("2024/01/02");
        let new_day = plugin.join("2024/01/03");
        std::fs::create_dir_all(&old_day).unwrap();
        std::fs::create_dir_all(&new_day).unwrap();
        std::fs::create_dir_all(root.path().join("empty-plugin")).unwrap();
        for f in ["a.eml", "a.json"] {
            std::fs::write(old_day.join(f), "x").unwrap();
            std::fs::write(new_day.join(f), "x").unwrap();
        }
        // Only the old day's files are older than the retention: "now" is
        // an hour on, and the new day's files are touched just before it.
        let later = SystemTime::now() + Duration::from_secs(3600);
        for f in ["a.eml", "a.json"] {
            let file = std::fs::File::options()
                .write(true)
                .open(new_day.join(f))
                .unwrap();
            file.set_modified(later - Duration::from_secs(60)).unwrap();
        }
        let swept = sweep(root.path(), Duration::from_secs(1800), later).unwrap();
        assert_eq!(
            swept,
            Swept {
                files: 2,
                folders: 1
            }
        );
        assert!(!old_day.exists());
        assert!(new_day.join("a.eml").exists());
        assert!(plugin.is_dir() && root.path().join("empty-plugin").is_dir());

        // Later still, everything goes but the plugins' own folders.
        let swept = sweep(
            root.path(),
            Duration::from_secs(1800),
            later + Duration::from_secs(7200),
        )
        .unwrap();
        assert_eq!(
            swept,
            Swept {
                files: 2,
                folders: 3
            }
        );
        assert!(plugin.is_dir() && std::fs::read_dir(&plugin).unwrap().next().is_none());
        assert_eq!(
            sweep(&root.path().join("missing"), Duration::ZERO, later).unwrap(),
            Swept::default()
        );
    }
}
