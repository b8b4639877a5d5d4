//! What the fuzz targets share: the readers under test take paths, so each input is written to
//! a scratch directory of this process (on /dev/shm where there is one) before it is read.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// This process's scratch directory, created on first use.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("whvi-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("the scratch directory can be created");
        dir
    })
}

/// Writes `bytes` as `name` in the scratch directory and returns its path.
pub fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    std::fs::write(&path, bytes).expect("the scratch file can be written");
    path
}

/// Splits `data` in two at the position its first two bytes give (little-endian, clamped), so
/// that one input can fill two files.
pub fn split_in_two(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<2>() else {
        return (data, &[]);
    };
    let at = usize::from(u16::from_le_bytes(*head)).min(rest.len());
    rest.split_at(at)
}
