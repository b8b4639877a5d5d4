//! Output files: atomic writes, and the refusal to write over an input or an existing file.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Writes a file atomically: `write` fills a temporary file next to `path`, which is synced
/// and renamed over `path` only if everything succeeded. On any failure the temporary file is
/// removed and whatever was at `path` before is untouched.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> io::Result<()> {
        let file = File::create(&tmp)?;
        let mut writer = BufWriter::new(file);
        write(&mut writer)?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Checks, before any work is done, that `path` may be written as `what` (e.g. `--report`):
/// it must not name the same file as any of `inputs` (however spelled: `./a`, a symbolic link),
/// nor exist at all unless `overwrite`. Creates its parent directory.
pub fn check_output(path: &Path, inputs: &[&Path], overwrite: bool, what: &str) -> Result<()> {
    if path.is_dir() {
        return Err(Error::invalid(format!(
            "{what} {} is a directory; give a file path",
            path.display()
        )));
    }
    if let Ok(target) = fs::canonicalize(path) {
        for input in inputs {
            if fs::canonicalize(input).is_ok_and(|input| input == target) {
                return Err(Error::invalid(format!(
                    "{what} {} is also an input ({}); writing it would destroy the input: \
                     choose another path",
                    path.display(),
                    input.display()
                )));
            }
        }
        if !overwrite {
            return Err(Error::invalid(format!(
                "{what} {} exists; choose another path, or pass --force to replace it",
                path.display()
            )));
        }
    }
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_never_replaces_an_input_and_replaces_a_file_only_when_asked() {
        let dir = std::env::temp_dir().join(format!("whvi-output-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let input = dir.join("ck.safetensors");
        fs::write(&input, b"weights").unwrap();
        let spelled_otherwise = dir.join(".").join("ck.safetensors");
        let err = check_output(&spelled_otherwise, &[&input], true, "--report").unwrap_err();
        assert!(err.to_string().contains("also an input"), "{err}");
        let err = check_output(&input, &[], false, "--report").unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        check_output(&input, &[], true, "--report").unwrap();
        let err = check_output(&dir, &[], true, "--report").unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");
        let fresh = dir.join("new/sub/report.json");
        check_output(&fresh, &[&input], false, "--report").unwrap();
        assert!(fresh.parent().unwrap().is_dir());
        assert_eq!(fs::read(&input).unwrap(), b"weights");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failed_write_leaves_previous_file_and_no_temporary() {
        let dir = std::env::temp_dir().join(format!("whvi-atomic-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        write_atomic(&path, |w| w.write_all(b"old contents")).unwrap();
        // Simulate a crash half-way through the save: the writer fails after some bytes.
        let err = write_atomic(&path, |w| {
            w.write_all(b"new, but only half")?;
            Err(io::Error::other("interrupted"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"old contents");
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        write_atomic(&path, |w| w.write_all(b"new contents")).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new contents");
        fs::remove_dir_all(&dir).unwrap();
    }
}
