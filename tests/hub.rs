//! `hf://OWNER/REPO/FILE` checkpoints, served without internet by a small HTTP server on
//! 127.0.0.1 that answers as the hub's resolve endpoint does; `HF_ENDPOINT` points at it and
//! `HF_HOME` at a fresh cache. One test: the environment is process-wide.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use whvi::checkpoint::{Checkpoint, CheckpointMeta};
use whvi::params::Params;
use whvi::zoo::{BuildOptions, ModelSpec, Network};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Requests seen, as "METHOD PATH".
type Log = Arc<Mutex<Vec<String>>>;

fn saved_checkpoint(dir: &std::path::Path) -> Vec<u8> {
    let spec = ModelSpec::lookup("lenet5").unwrap();
    let options = BuildOptions {
        width: 0.5,
        ..BuildOptions::default()
    };
    let params = Params::new(1);
    Network::build(
        &spec,
        &options,
        params.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let meta = CheckpointMeta::new(spec, options, (0..10).map(|i| i.to_string()).collect());
    let path = dir.join("lenet.safetensors");
    Checkpoint::save(&path, &meta, &params, &[]).unwrap();
    std::fs::read(path).unwrap()
}

/// Serves `files` (by request path) on a free port; `truncated` paths announce their full
/// length but send half of it.
fn serve(files: HashMap<String, Vec<u8>>, truncated: Vec<String>, log: Log) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let mut if_none_match = None;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("if-none-match:") {
                    if_none_match = Some(v.trim().trim_matches('"').to_string());
                }
            }
            let mut words = request.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            log.lock().unwrap().push(format!("{method} {path}"));
            let Some(body) = files.get(path) else {
                let _ = stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nX-Error-Code: EntryNotFound\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            let etag = format!("{:08x}", crc32fast::hash(body));
            let head = |status: &str| {
                format!(
                    "HTTP/1.1 {status}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
            };
            if if_none_match.as_deref() == Some(etag.as_str()) {
                let _ = stream.write_all(head("304 Not Modified").as_bytes());
                continue;
            }
            let _ = stream.write_all(head("200 OK").as_bytes());
            if method == "GET" {
                let sent = if truncated.iter().any(|t| t == path) {
                    &body[..body.len() / 2]
                } else {
                    &body[..]
                };
                let _ = stream.write_all(sent);
            }
        }
    });
    port
}

#[test]
fn hub_checkpoints_download_once_and_fail_clearly() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("hub");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = saved_checkpoint(&dir);
    let files = HashMap::from([
        (
            "/me/nets/resolve/main/lenet.safetensors".to_string(),
            bytes.clone(),
        ),
        // Other bytes (the cache keys blobs by ETag), of which half arrive.
        (
            "/me/nets/resolve/main/cut.safetensors".to_string(),
            [&bytes[..], b" "].concat(),
        ),
    ]);
    let log: Log = Arc::default();
    let port = serve(
        files,
        vec!["/me/nets/resolve/main/cut.safetensors".into()],
        log.clone(),
    );
    // Set before any client exists; this test binary holds no other test.
    std::env::set_var("HF_ENDPOINT", format!("http://127.0.0.1:{port}"));
    std::env::set_var("HF_HOME", dir.join("hf-home"));
    std::env::set_var("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1");
    std::env::set_var("NO_PROXY", "127.0.0.1");

    let gets = |log: &Log, file: &str| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|r| r.starts_with("GET") && r.ends_with(file))
            .count()
    };
    let path = PathBuf::from("hf://me/nets/lenet.safetensors");
    let model = Checkpoint::load(&path, &Device::Cpu).unwrap();
    assert_eq!(model.meta.spec.name, "lenet5");
    assert_eq!(
        gets(&log, "lenet.safetensors"),
        1,
        "{:?}",
        log.lock().unwrap()
    );
    // Into the hub's cache under HF_HOME; a second load reads it and downloads nothing.
    assert!(dir.join("hf-home/hub/models--me--nets").is_dir());
    Checkpoint::load(&path, &Device::Cpu).unwrap();
    assert_eq!(
        gets(&log, "lenet.safetensors"),
        1,
        "{:?}",
        log.lock().unwrap()
    );

    let missing = Checkpoint::load("hf://me/nets/nothing.safetensors", &Device::Cpu);
    let message = missing.err().unwrap().to_string();
    assert!(
        message.contains("hf://me/nets/nothing.safetensors"),
        "{message}"
    );
    assert!(message.contains("cannot be downloaded"), "{message}");

    let cut = Checkpoint::load("hf://me/nets/cut.safetensors", &Device::Cpu);
    let message = cut.err().unwrap().to_string();
    assert!(
        message.contains("hf://me/nets/cut.safetensors"),
        "{message}"
    );
    // Refused in the download (the body ends early), not read as a broken file.
    assert!(message.contains("cannot be downloaded"), "{message}");

    let bad = Checkpoint::load("hf://me/lenet.safetensors", &Device::Cpu);
    let message = bad.err().unwrap().to_string();
    assert!(message.contains("hf://OWNER/REPO/FILE"), "{message}");
}
