//! Checkpoints on the Hugging Face hub: `hf://OWNER/REPO/FILE` wherever a checkpoint path is
//! taken. The file is downloaded through the `hf-hub` crate into the hub's usual cache
//! (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`) from `$HF_ENDPOINT` (default
//! <https://huggingface.co>); a file already cached is not downloaded again.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The prefix that names a file on the hub.
pub const PREFIX: &str = "hf://";

/// The (owner, repository, file) that `path` names, if it is an `hf://` path; an `hf://` path
/// without all three parts is an error.
pub fn parse(path: &Path) -> Result<Option<(&str, &str, &str)>> {
    let Some(rest) = path.to_str().and_then(|p| p.strip_prefix(PREFIX)) else {
        return Ok(None);
    };
    let mut parts = rest.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(owner), Some(repo), Some(file))
            if !owner.is_empty() && !repo.is_empty() && !file.is_empty() =>
        {
            Ok(Some((owner, repo, file)))
        }
        _ => Err(Error::invalid(format!(
            "{} does not name a file on the hub: write hf://OWNER/REPO/FILE.safetensors",
            path.display()
        ))),
    }
}

/// The local cached copy of the hub file `path` names, downloaded first if needed.
pub fn fetch(path: &Path, owner: &str, repo: &str, file: &str) -> Result<PathBuf> {
    let fail = |e: hf_hub::HFError| {
        Error::checkpoint(
            path,
            format!(
                "cannot be downloaded ({e}); check the name, your network, and HF_ENDPOINT / \
                 HF_TOKEN if you set them"
            ),
        )
    };
    let client = hf_hub::HFClientSync::new().map_err(fail)?;
    client
        .model(owner, repo)
        .download_file()
        .filename(file)
        .send()
        .map_err(fail)
}
