//! Training over MPI ranks (`cargo test --features mpi`; needs Open MPI's `mpirun`): two ranks
//! with half of each batch make the updates one process makes (on the CPU; with the `nccl`
//! feature also on two GPUs), a two-rank run resumes, and a rank that dies ends the job and
//! leaves the last checkpoint readable.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use whvi::checkpoint::Checkpoint;

use common::write_dataset;

const WHVI: &str = env!("CARGO_BIN_EXE_whvi");

/// A fresh, empty scratch folder for one test.
/// It lives under cargo's temporary folder for tests, so what a failed run leaves is replaced
/// by the next run instead of piling up in /tmp.
fn temp_root(name: &str) -> PathBuf {
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mpi-{name}"));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    root
}

/// A small WHVI network with batch normalisation after each convolution.
fn tiny_spec(root: &Path) -> PathBuf {
    let path = root.join("tiny.toml");
    std::fs::write(
        &path,
        "name = \"tiny\"\nsummary = \"a test network\"\ninput = [3, 32, 32]\nclasses = 10\n\
         batch_norm = true\nfeatures = [{ conv = 8, kernel = 3, stride = 2 }, \"M\", \
         { conv = 16, kernel = 3 }, \"M\", \"M\"]\nhead = [64]\n",
    )
    .unwrap();
    path
}

/// `whvi train` arguments of a run on the data in `root`: WHVI layers, with a mean-field
/// convolution (local reparameterisation) and MC dropout before the hidden dense layer, so that
/// every kind of per-example noise is drawn.
fn train_args(root: &Path, out: &str, epochs: usize) -> Vec<String> {
    let spec = tiny_spec(root);
    [
        "train",
        "--dataset",
        "cifar10",
        "--data",
        root.to_str().unwrap(),
        "--model",
        spec.to_str().unwrap(),
        "--method",
        "whvi",
        "--bayes",
        "all",
        "--layer",
        "conv2=mean-field",
        "--layer",
        "fc1=mc-dropout",
        "--batch-size",
        "32",
        "--validation",
        "64",
        "--eval-samples",
        "2",
        "--test-samples",
        "0",
        "--quiet",
        "--threads",
        "1",
        "--epochs",
        &epochs.to_string(),
        "--out",
        root.join(out).to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn mpirun(ranks: usize, args: &[String]) -> Command {
    let mut command = Command::new("mpirun");
    command
        .args(["--allow-run-as-root", "--oversubscribe", "-n"])
        .arg(ranks.to_string())
        .arg(WHVI)
        .args(args);
    command
}

fn finished(mut command: Command) -> Output {
    let output = command.output().expect("mpirun (Open MPI) is on the PATH");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    let checkpoint = Checkpoint::read(path, &Device::Cpu).unwrap();
    let optimizer = checkpoint.optimizer.into_iter();
    let optimizer = optimizer.map(|(name, t)| (format!("optimizer.{name}"), t));
    checkpoint.weights.into_iter().chain(optimizer).collect()
}

fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    (norm(&(&a - &b).unwrap()) / norm(&a).max(1e-300)).sqrt()
}

/// Tensors whose exact gradient is zero because batch normalisation follows their layer: a
/// convolution's bias (BN subtracts the channel mean) and a WHVI convolution's output diagonal
/// `s1` (BN divides out each channel's scale). Their gradient is rounding residue, which Adam
/// turns into steps of about the learning rate, so they (and the running statistics that see
/// the bias) differ as much between one process at 1 and at 2 threads: no reordering of sums
/// reproduces them.
fn batch_norm_makes_irrelevant(name: &str) -> bool {
    let layer_is_conv = |n: &str| n.split('.').any(|part| part.starts_with("conv"));
    layer_is_conv(name) && (name.ends_with(".bias") || name.ends_with(".s1"))
        || name.contains("running_")
}

/// Trains with `extra` arguments as one process and as `ranks` ranks, and compares the last
/// checkpoints and the logged losses.
fn ranks_update_like_one_process(name: &str, ranks: usize, extra: &[&str]) {
    let root = write_dataset(&temp_root(name), 64);
    let args = |out: &str| -> Vec<String> {
        let mut args = train_args(&root, out, 2);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let mut one = Command::new(WHVI);
    one.args(args("one"));
    finished(one);
    finished(mpirun(ranks, &args("ranks")));

    let (one, many) = (
        tensors(&root.join("one/last.safetensors")),
        tensors(&root.join("ranks/last.safetensors")),
    );
    assert_eq!(
        one.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        many.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    let mut compared = 0;
    for ((name, a), (_, b)) in one.iter().zip(&many) {
        if batch_norm_makes_irrelevant(name) {
            continue;
        }
        let d = relative_difference(a, b);
        assert!(d <= 1e-5, "{name}: relative difference {d:e}");
        compared += 1;
    }
    // Every other weight, BN scale and shift, and their Adam moments were compared.
    assert!(compared >= 30, "only {compared} tensors compared");
    // Each epoch's logged loss is the global batch's on both.
    let log = |run: &str| std::fs::read_to_string(root.join(run).join("metrics.jsonl")).unwrap();
    let loss = |line: &str| -> f64 {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["train_loss"].as_f64().unwrap()
    };
    let (a, b) = (log("one"), log("ranks"));
    assert_eq!(a.lines().count(), 2);
    for (x, y) in a.lines().zip(b.lines()) {
        assert!(
            (loss(x) - loss(y)).abs() <= 1e-6 * loss(x).abs(),
            "{x}\n{y}"
        );
    }
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn two_ranks_with_half_batches_update_like_one_process() {
    ranks_update_like_one_process("equal", 2, &[]);
}

/// Needs two CUDA GPUs and the `nccl` feature (`cargo test --release --features nccl --test
/// mpi two_gpus`): each rank trains on its own GPU (`--device cuda`), gradients and batch-norm
/// statistics summed by NCCL, and makes the updates one process makes on one GPU.
#[cfg(feature = "nccl")]
#[test]
fn two_gpus_with_half_batches_update_like_one_gpu() {
    let gpus = candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
        .expect("this test needs the CUDA driver");
    assert!(
        gpus >= 2,
        "this test needs two CUDA GPUs; this machine has {gpus}"
    );
    ranks_update_like_one_process("gpus", 2, &["--device", "cuda"]);
}

/// Shards of 10, 11 and 11 examples; two posterior samples a step (batch norm synchronised in
/// each); WHVI convolutions drawing filters per example.
#[test]
fn three_uneven_shards_with_two_samples_and_per_example_filters_update_like_one_process() {
    let extra = ["--mc-samples", "2", "--conv-sampling", "per-example"];
    ranks_update_like_one_process("uneven", 3, &extra);
}

#[test]
fn a_two_rank_run_stopped_after_an_epoch_resumes_to_the_uninterrupted_run() {
    let root = write_dataset(&temp_root("resume"), 64);
    finished(mpirun(2, &train_args(&root, "straight", 2)));
    // A time limit of 60 µs stops after the first epoch (which takes longer) with a resumable
    // checkpoint.
    let mut first = train_args(&root, "resumed", 2);
    first.extend(["--time-limit".to_string(), "0.000001".to_string()]);
    finished(mpirun(2, &first));
    let log = std::fs::read_to_string(root.join("resumed/metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 1, "{log}");
    let mut rest = train_args(&root, "resumed", 2);
    rest.push("--resume".to_string());
    finished(mpirun(2, &rest));

    let straight = tensors(&root.join("straight/last.safetensors"));
    let resumed = tensors(&root.join("resumed/last.safetensors"));
    assert_eq!(straight.len(), resumed.len());
    for ((name, a), (_, b)) in straight.iter().zip(&resumed) {
        assert_eq!(relative_difference(a, b), 0.0, "{name}");
    }
    std::fs::remove_dir_all(root).unwrap();
}

/// The pid of the rank `rank` that `mpirun` started, once it runs.
fn rank_pid(launcher: u32, rank: usize) -> Option<u32> {
    let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // The parent pid is the second field after the parenthesised command name.
            let parent: u32 = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            let has_rank = environ.split(|&b| b == 0).any(|v| v == wanted.as_bytes());
            (parent == launcher && has_rank).then_some(pid)
        })
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn exit_within(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("the job did not end within {limit:?} of a rank's death");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A long 2-rank run in `root/run`, once its first checkpoint is written.
fn long_run_after_its_first_epoch(root: &Path) -> Child {
    let job = mpirun(2, &train_args(root, "run", 400))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun (Open MPI) is on the PATH");
    let last = root.join("run/last.safetensors");
    wait_for("the first checkpoint", Duration::from_secs(120), || {
        last.exists()
    });
    job
}

/// Sends `signal` to rank `rank` of the job.
fn signal_rank(job: &Child, rank: usize, signal: &str) {
    let pid = rank_pid(job.id(), rank).expect("the ranks are children of mpirun");
    let sent = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status();
    assert!(sent.unwrap().success());
}

/// Waits (at most a minute) for the job to fail, and returns what it wrote to stderr.
fn failure_output(mut job: Child) -> String {
    let status = exit_within(&mut job, Duration::from_secs(60));
    assert!(!status.success(), "the job must fail");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut job.stderr.take().unwrap(), &mut stderr).unwrap();
    stderr
}

/// One more epoch of the run in `root/run`, resumed by 2 ranks.
fn resume_for_an_epoch(root: &Path) {
    let mut resume = train_args(root, "run", 400);
    resume.extend(["--resume", "--time-limit", "0.000001"].map(String::from));
    finished(mpirun(2, &resume));
}

#[test]
fn a_killed_rank_ends_the_job_and_the_last_checkpoint_resumes() {
    let root = write_dataset(&temp_root("killed"), 128);
    let job = long_run_after_its_first_epoch(&root);
    // SIGKILL: no handler runs, as when a node is lost.
    signal_rank(&job, 1, "-9");
    let stderr = failure_output(job);
    assert!(
        stderr.contains("rank 1") && stderr.contains("signal 9"),
        "mpirun names the dead rank and the signal: {stderr}"
    );
    // The checkpoint was written atomically: it reads, and the run resumes from it.
    let last = root.join("run/last.safetensors");
    Checkpoint::read(&last, &Device::Cpu).expect("the last checkpoint stays intact");
    resume_for_an_epoch(&root);
    std::fs::remove_dir_all(root).unwrap();
}

/// The report without its timing, which differs from run to run.
fn report_without_seconds(path: &Path) -> serde_json::Value {
    fn strip(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => map
                .into_iter()
                .filter(|(k, _)| k != "seconds")
                .map(|(k, v)| (k, strip(v)))
                .collect(),
            serde_json::Value::Array(items) => items.into_iter().map(strip).collect(),
            other => other,
        }
    }
    strip(serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap())
}

#[test]
fn evaluation_spread_over_two_ranks_reports_what_one_process_does() {
    let root = write_dataset(&temp_root("eval"), 64);
    finished(mpirun(2, &train_args(&root, "run", 1)));
    let eval_args = |report: &str, probs: &str| -> Vec<String> {
        let checkpoint = root.join("run/best.safetensors");
        let mut args: Vec<String> = ["eval", checkpoint.to_str().unwrap(), "--data"]
            .map(String::from)
            .to_vec();
        args.push(root.display().to_string());
        args.extend(
            [
                "--samples",
                "3",
                "--corruptions",
                "all",
                "--corruption-images",
                "40",
                "--ood",
                "noise",
                "--threads",
                "1",
                "--report",
            ]
            .map(String::from),
        );
        args.push(root.join(report).display().to_string());
        args.push("--save-probs".into());
        args.push(root.join(probs).display().to_string());
        args
    };
    let mut one = Command::new(WHVI);
    one.args(eval_args("one.json", "one-probs"));
    finished(one);
    let two = finished(mpirun(2, &eval_args("two.json", "two-probs")));
    // Rank 0 alone prints the report.
    let printed = String::from_utf8_lossy(&two.stdout);
    assert_eq!(printed.matches("report: ").count(), 1, "{printed}");

    let (a, b) = (
        report_without_seconds(&root.join("one.json")),
        report_without_seconds(&root.join("two.json")),
    );
    assert_eq!(a, b);
    let corruptions = a["corruptions"].as_array().unwrap();
    assert_eq!(
        corruptions.len(),
        14 * 5,
        "every corruption at every severity"
    );
    // Every set's predictions were saved once, whichever rank made them, with the same bytes.
    let files = |dir: &str| -> Vec<(String, Vec<u8>)> {
        let run = std::fs::read_dir(root.join(dir))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let mut files: Vec<_> = std::fs::read_dir(run.path())
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).unwrap())
            })
            .collect();
        files.sort();
        files
    };
    let (saved_one, saved_two) = (files("one-probs"), files("two-probs"));
    assert!(saved_one.len() > 2 * 70, "{} files", saved_one.len());
    assert!(saved_one == saved_two, "the saved predictions differ");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_batch_smaller_than_the_ranks_is_refused_and_ends_the_job() {
    let root = write_dataset(&temp_root("small-batch"), 16);
    let mut args = train_args(&root, "run", 1);
    let batch = args.iter().position(|a| a == "--batch-size").unwrap();
    args[batch + 1] = "1".into();
    let output = mpirun(2, &args)
        .output()
        .expect("mpirun (Open MPI) is on the PATH");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--batch-size 1 is the global batch and cannot be split over 2 ranks"),
        "{stderr}"
    );
    assert!(!root.join("run").exists(), "a refused run writes nothing");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn sigint_to_the_ranks_stops_them_at_one_batch_with_a_resumable_checkpoint() {
    let root = write_dataset(&temp_root("sigint"), 128);
    let job = long_run_after_its_first_epoch(&root);
    signal_rank(&job, 0, "-INT");
    signal_rank(&job, 1, "-INT");
    // An interrupted run exits with 130.
    let stderr = failure_output(job);
    // Both ranks stopped after the same batch, which rank 0 saved.
    let stop_of = |prefix: &str| -> String {
        let line = stderr.lines().find(|l| l.contains(prefix));
        let line = line.unwrap_or_else(|| panic!("no '{prefix}' in {stderr}"));
        line[line.find(" at epoch").unwrap()..].to_string()
    };
    assert_eq!(
        stop_of("interrupted: saved a resumable"),
        stop_of("interrupted: rank 0 saved a resumable")
    );
    resume_for_an_epoch(&root);
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn ranks_started_with_different_settings_are_refused() {
    let root = write_dataset(&temp_root("mismatch"), 32);
    let args = train_args(&root, "run", 1);
    let mut other = args.clone();
    other.extend(["--seed", "7"].map(String::from));
    // One launch, two programs (MPMD): rank 1 has another seed.
    let output = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-n", "1", WHVI])
        .args(&args)
        .args([":", "-n", "1", WHVI])
        .args(&other)
        .output()
        .expect("mpirun (Open MPI) is on the PATH");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the ranks hold different settings or data"),
        "{stderr}"
    );
    std::fs::remove_dir_all(root).unwrap();
}
