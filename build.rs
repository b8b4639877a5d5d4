//! Compiles the CUDA FWHT kernels to PTX when the `cuda` feature is on, and lists the shipped
//! checkpoints of `models/pretrained/` for `whvi::checkpoint::pretrained` to embed.
//!
//! nvcc is looked up in `$CUDA_HOME/bin`, then on `PATH`. `CUDA_COMPUTE_CAP` (e.g. 90) picks
//! the virtual architecture (default 80: the PTX is JIT-compiled for any newer GPU).
//! `WHVI_PTX_VERSION` (e.g. 8.4) rewrites the PTX ISA version, for drivers older than the nvcc
//! that built the crate (`nvidia-smi` shows the driver's CUDA version).

use std::path::PathBuf;
use std::process::Command;

const KERNEL: &str = "src/fwht/kernels/fwht.cu";
const PRETRAINED: &str = "models/pretrained";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Err(message) = list_pretrained() {
        panic!("whvi: listing the shipped checkpoints failed: {message}");
    }
    println!("cargo:rerun-if-changed={KERNEL}");
    for var in ["CUDA_HOME", "CUDA_COMPUTE_CAP", "WHVI_PTX_VERSION"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(message) = compile_ptx() {
        // A build script reports failure by panicking; the message is what the user reads.
        panic!("whvi: building the CUDA kernels failed: {message}");
    }
}

/// Writes `$OUT_DIR/pretrained.rs`: one `(name, bytes)` entry per `NAME.safetensors` in
/// `models/pretrained/`, sorted by name, so that dropping a file there ships it.
fn list_pretrained() -> Result<(), String> {
    println!("cargo:rerun-if-changed={PRETRAINED}");
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let mut names: Vec<String> = match std::fs::read_dir(root.join(PRETRAINED)) {
        Ok(entries) => entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter_map(|path| {
                let name = path.file_name()?.to_str()?.strip_suffix(".safetensors")?;
                Some(name.to_string())
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    let mut code =
        String::from("/// The shipped checkpoints: (name, file bytes), sorted by name.\n");
    code.push_str("static SHIPPED: &[(&str, &[u8])] = &[\n");
    // The path is joined when the library compiles, not here: the build script's output is
    // reused when the same tree is built from another directory (a second clone or worktree
    // sharing CARGO_TARGET_DIR), and an absolute path written here would name the first one.
    for name in &names {
        let relative = format!("/{PRETRAINED}/{name}.safetensors");
        code.push_str(&format!(
            "    ({name:?}, include_bytes!(concat!(env!(\"CARGO_MANIFEST_DIR\"), {relative:?}))),\n"
        ));
    }
    code.push_str("];\n");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    std::fs::write(out_dir.join("pretrained.rs"), code).map_err(|e| e.to_string())
}

fn compile_ptx() -> Result<(), String> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let ptx_path = out_dir.join("fwht.ptx");
    let nvcc = match std::env::var_os("CUDA_HOME") {
        Some(home) => PathBuf::from(home).join("bin").join("nvcc"),
        None => PathBuf::from("nvcc"),
    };
    let compute_cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".to_string());
    let compute_cap: u32 = compute_cap.trim().parse().map_err(|_| {
        format!("CUDA_COMPUTE_CAP must be a number such as 90, got {compute_cap:?}")
    })?;
    let mut command = Command::new(&nvcc);
    command
        .arg("--ptx")
        .arg(format!("-arch=compute_{compute_cap}"))
        .arg("-O3")
        .arg("-std=c++17")
        .arg(KERNEL)
        .arg("-o")
        .arg(&ptx_path);
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        command.arg(format!(
            "-I{}",
            PathBuf::from(home).join("include").display()
        ));
    }
    let output = command.output().map_err(|e| {
        format!(
            "could not run {} ({e}); install the CUDA toolkit (or the PyPI wheels \
             nvidia-cuda-nvcc, nvidia-cuda-crt, nvidia-cuda-runtime, nvidia-cuda-cccl, \
             nvidia-nvvm) and set CUDA_HOME to the folder holding bin/nvcc",
            nvcc.display()
        )
    })?;
    if !output.status.success() {
        return Err(format!(
            "nvcc failed on {KERNEL}:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    if let Ok(version) = std::env::var("WHVI_PTX_VERSION") {
        set_ptx_version(&ptx_path, version.trim())?;
    }
    Ok(())
}

/// Rewrites the `.version X.Y` line of the PTX file.
fn set_ptx_version(path: &PathBuf, version: &str) -> Result<(), String> {
    let valid = version
        .split_once('.')
        .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok());
    if !valid {
        return Err(format!(
            "WHVI_PTX_VERSION must look like 8.4, got {version:?}"
        ));
    }
    let ptx = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let rewritten: Vec<String> = ptx
        .lines()
        .map(|line| {
            if line.starts_with(".version ") {
                format!(".version {version}")
            } else {
                line.to_string()
            }
        })
        .collect();
    std::fs::write(path, rewritten.join("\n") + "\n").map_err(|e| e.to_string())
}
