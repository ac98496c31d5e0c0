//! Small helpers shared by the writers.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A sibling path with a temporary suffix, unique per process, so a crash never leaves a file
/// under the final name that looks whole.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// A new read/write file at `path`, unlinked at once: scratch space that has no name and
/// vanishes with the process, even after a crash.
pub fn unlinked_scratch_file(path: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
    std::fs::remove_file(path).ok();
    Ok(file)
}

/// Outputs go into an existing folder: a typo in the path should not silently create folders.
pub(crate) fn check_parent(path: &Path) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        anyhow::bail!("cannot write {}: folder {} does not exist", path.display(), parent.display());
    }
    Ok(())
}

/// Removes temporaries that an earlier, killed writer of `path` left behind: siblings named
/// `.NAME.PID.tmp` (or a GGUF writer's `.NAME.PID.spool`) whose process no longer runs. A
/// SIGKILL cannot be caught, so the dead writer could not clean up itself; a live one (another
/// dropwise writing the same output now) is left alone. Only where `/proc` tells which
/// processes run (Linux); elsewhere nothing is removed.
pub fn sweep_stale_temps(path: &Path) {
    let (Some(name), Some(parent)) = (path.file_name(), path.parent()) else { return };
    if !Path::new("/proc/self").exists() {
        return;
    }
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(".tmp").or_else(|| rest.strip_suffix(".spool"))) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let stale = entry.path();
        // symlink_metadata: a stale name is removed as what it is, never followed.
        let is_dir = std::fs::symlink_metadata(&stale).map(|m| m.is_dir()).unwrap_or(false);
        let _ = if is_dir { std::fs::remove_dir_all(&stale) } else { std::fs::remove_file(&stale) };
    }
}

/// Checks before long work that `path` can be written: its folder exists and a file can be
/// created there (the probe, a temporary name, is removed at once). A run that trains for an
/// hour must not find out at the end that its output folder is missing or read-only.
pub fn probe_writable(path: &Path) -> Result<()> {
    if path.file_name().is_none() {
        anyhow::bail!("output path {:?} names no file", path.display().to_string());
    }
    check_parent(path)?;
    refuse_foreign_folder(path)?;
    let probe = temp_sibling(path).with_extension("probe");
    std::fs::File::create(&probe).with_context(|| format!("cannot create {}", path.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Writes a file through `fill` into a temporary name, then renames it over `path`.
pub fn write_atomically(path: &Path, fill: impl FnOnce(&mut std::fs::File) -> Result<()>) -> Result<()> {
    check_parent(path)?;
    sweep_stale_temps(path);
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", path.display()))?;
        fill(&mut f)?;
        f.sync_all().ok();
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// An existing folder at `path` may be replaced only if it is empty or holds a `config.json`
/// (a model folder, presumably an earlier output); anything else is refused.
fn refuse_foreign_folder(path: &Path) -> Result<()> {
    if !path.is_dir() {
        return Ok(());
    }
    let empty = std::fs::read_dir(path)?.next().is_none();
    if !empty && !path.join("config.json").exists() {
        anyhow::bail!("output folder {} exists and is not a model folder; refusing to replace it", path.display());
    }
    Ok(())
}

/// Writes a folder: `fill` populates a temporary folder beside `path`, which is renamed into place
/// when complete. An existing folder at `path` is replaced only if it holds a `config.json`
/// (i.e. it is a model folder, presumably an earlier output); anything else is refused.
pub fn write_dir_atomically(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    check_parent(path)?;
    if path.exists() {
        if !path.is_dir() {
            anyhow::bail!("output {} exists and is not a folder", path.display());
        }
        refuse_foreign_folder(path)?;
    }
    sweep_stale_temps(path);
    let tmp = temp_sibling(path);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", path.display()))?;
    let result = fill(&tmp).and_then(|_| {
        if path.exists() {
            std::fs::remove_dir_all(path).with_context(|| format!("cannot replace {}", path.display()))?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

thread_local! {
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs third-party parsing that can panic on hostile input (the tokenizers crate has `expect`s
/// in its deserializers and its added-token splitting) and turns a panic into an error naming
/// `what`. Panic hooks ask [`catching_foreign_panic`] to stay quiet meanwhile.
pub fn catch_foreign_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    let outer = CATCHING.with(|c| c.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    r.map_err(|p| {
        let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
        anyhow::anyhow!("{what}: {}", msg.replace('\n', " "))
    })
}

/// Whether this thread is inside [`catch_foreign_panic`] (a panic here becomes an error).
pub fn catching_foreign_panic() -> bool {
    CATCHING.with(|c| c.get())
}

/// Formats a count with a metric suffix: 134.5M, 1.2G.
pub fn human(n: f64) -> String {
    let (v, s) = if n >= 1e12 {
        (n / 1e12, "T")
    } else if n >= 1e9 {
        (n / 1e9, "G")
    } else if n >= 1e6 {
        (n / 1e6, "M")
    } else if n >= 1e3 {
        (n / 1e3, "k")
    } else {
        (n, "")
    };
    format!("{v:.2}{s}")
}

/// FNV-1a, 64-bit: a stable digest of bytes (saved importances and checkpoints name what they
/// were computed on by it; not for security).
pub struct Fnv1a(u64);

impl Fnv1a {
    pub fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    pub fn eat(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The digest as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

impl Default for Fnv1a {
    fn default() -> Self {
        Self::new()
    }
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes; `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn a_dead_writers_temporary_is_swept_and_a_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.gguf");
        // A pid that has exited: a child that ran `true` and was reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = dir.path().join(format!(".m.gguf.{dead}.tmp"));
        let stale_dir = dir.path().join(format!(".m.gguf.{dead}.tmp.d"));
        std::fs::write(&stale, b"partial").unwrap();
        let live = dir.path().join(".m.gguf.1.tmp");
        let other = dir.path().join(format!(".n.gguf.{dead}.tmp"));
        std::fs::write(&live, b"init's").unwrap();
        std::fs::write(&other, b"another output's").unwrap();
        std::fs::create_dir(&stale_dir).unwrap();
        write_atomically(&out, |f| Ok(std::io::Write::write_all(f, b"whole")?)).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"whole");
        assert!(!stale.exists(), "the dead writer's temporary was left");
        assert!(live.exists(), "a temporary of a running process (pid 1) was removed");
        assert!(other.exists(), "another output's temporary was removed");
        assert!(stale_dir.exists(), "a name that is not NAME.PID.tmp was removed");
    }
}
