//! The `whvi` command line: parses arguments and calls the library.

mod args;
mod bench;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;

use args::{Bench, Cli, Command};

fn main() -> ExitCode {
    whvi::device::tune_cpu();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(whvi::Error::Interrupted(message)) => {
            eprintln!("whvi: interrupted: {message}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("whvi: error: {}", e.without_backtrace());
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> whvi::Result<()> {
    match cli.command {
        Command::Train(args) => train_command(&args),
        Command::Zoo(args) if args.pretrained => {
            print!("{}", whvi::checkpoint::pretrained::listing()?);
            Ok(())
        }
        Command::Zoo(args) => {
            match &args.model {
                None => {
                    for spec in whvi::zoo::ModelSpec::builtin() {
                        println!("{:<8} {}", spec.name, spec.summary);
                    }
                    println!("\n(`whvi zoo NAME --method whvi` shows a network's layers)");
                }
                Some(name) => {
                    let spec = whvi::zoo::ModelSpec::lookup(name)?;
                    print!("{}", whvi::zoo::summary(&spec, &args.build.to_options()?)?);
                }
            }
            Ok(())
        }
        Command::Eval(args) => eval_command(&args),
        Command::Corrupt(args) => corrupt_command(&args),
        Command::Info { checkpoint } => {
            print!("{}", whvi::checkpoint::describe(&checkpoint)?);
            Ok(())
        }
        Command::Card(args) => {
            let out = whvi::checkpoint::card::write_readme(
                &args.checkpoint,
                args.out.as_deref(),
                args.force,
            )?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::Export(args) => {
            let sidecar =
                whvi::checkpoint::export::export_mean(&args.checkpoint, &args.mean, args.force)?;
            println!("wrote {} and {}", args.mean.display(), sidecar.display());
            Ok(())
        }
        Command::Publish(args) => {
            let card = whvi::checkpoint::publish(
                &args.checkpoint,
                &args.out,
                args.card_input()?,
                args.dtype.into(),
                args.force,
            )?;
            println!(
                "wrote {} ({})\n{}",
                args.out.display(),
                card.name,
                card.describe()
            );
            Ok(())
        }
        Command::Metrics(args) => {
            whvi::metrics::run_metrics(&args.to_job(), &mut std::io::stdout())?;
            Ok(())
        }
        Command::Bench(bench) => bench_command(bench),
    }
}

/// `whvi train`: a run with a Ctrl-C handler that saves a resumable checkpoint.
fn train_command(args: &args::TrainArgs) -> whvi::Result<()> {
    args.runtime.apply()?;
    let group = whvi::dist::Group::from_environment()?;
    let device = args
        .runtime
        .device(&group)
        .map_err(|e| end_group_on_error(&group, e))?;
    let (config, note) = args.to_config()?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let handler_flag = stop.clone();
    ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nwhvi: second Ctrl-C, exiting without saving");
            std::process::exit(130);
        }
        eprintln!("\nwhvi: Ctrl-C: saving a resumable checkpoint after this batch...");
    })
    .map_err(|e| whvi::Error::invalid(format!("cannot install the Ctrl-C handler: {e}")))?;
    let mut progress: Box<dyn whvi::train::Progress> = if args.quiet {
        Box::new(whvi::train::QuietProgress)
    } else {
        Box::new(whvi::train::BarProgress::new(config.batch_size))
    };
    let outcome = match whvi::train::train_in_group(
        &config,
        args.start(),
        &device,
        &group,
        progress.as_mut(),
        stop,
    ) {
        Ok(outcome) => outcome,
        Err(e) => return Err(end_group_on_error(&group, e)),
    };
    if !group.is_leader() {
        return Ok(());
    }
    println!("last checkpoint: {}", outcome.last_checkpoint.display());
    println!("best checkpoint: {}", outcome.best_checkpoint.display());
    println!(
        "metrics log:     {}",
        config.out.join("metrics.jsonl").display()
    );
    if let Some(report) = outcome.test_report {
        println!(
            "\ntest set, {} posterior samples (best checkpoint):\n{report}",
            config.test_samples
        );
    }
    Ok(())
}

/// `whvi eval`: the reports, the side-by-side table and where the JSON went.
fn eval_command(args: &args::EvalArgs) -> whvi::Result<()> {
    args.runtime.apply()?;
    let group = whvi::dist::Group::from_environment()?;
    let device = args
        .runtime
        .device(&group)
        .map_err(|e| end_group_on_error(&group, e))?;
    let config = args.to_config()?;
    let leader = group.is_leader();
    let mut progress = |line: &str| {
        if leader {
            eprintln!("{line}")
        }
    };
    let reports = match whvi::eval::evaluate_in_group(&config, &device, &group, &mut progress) {
        Ok(reports) => reports,
        Err(e) => return Err(end_group_on_error(&group, e)),
    };
    if !leader {
        return Ok(());
    }
    for report in &reports {
        println!("{}\n{}", report.checkpoint.display(), report.metrics);
        if let Some(mean) = &report.corruption_mean {
            println!(
                "corrupted sets (mean of {}): accuracy {:.4}, NLL {:.4}, Brier {:.4}, \
                 ECE-15 {:.4}\n",
                report.corruptions.len(),
                mean.accuracy,
                mean.nll,
                mean.brier,
                mean.ece15
            );
        }
    }
    println!("{}", whvi::eval::comparison_table(&reports));
    if let Some(path) = &config.report {
        println!("report: {}", path.display());
    }
    Ok(())
}

/// `whvi corrupt`: the test set under whvi's corruptions, in CIFAR-10-C's layout.
fn corrupt_command(args: &args::CorruptArgs) -> whvi::Result<()> {
    let shift = whvi::eval::ShiftSource::parse(&args.corruptions)?;
    let Some(whvi::eval::ShiftSource::OnTheFly(corruptions)) = shift else {
        return Err(whvi::Error::invalid(
            "--corruptions takes `all` or names of corruptions made on the fly",
        ));
    };
    let test = whvi::data::load(whvi::data::DatasetKind::Cifar10, args.data.as_deref())?.test;
    let test = match args.images {
        Some(n) => test.first(n)?,
        None => test,
    };
    whvi::eval::write_cifar10c(&args.out, &test, &corruptions, args.seed, &mut |line| {
        eprintln!("{line}")
    })?;
    println!(
        "wrote {} corruptions x 5 severities x {} images to {}",
        corruptions.len(),
        test.len(),
        args.out.display()
    );
    Ok(())
}

/// `whvi bench ...`: one JSON line per configuration.
fn bench_command(bench: Bench) -> whvi::Result<()> {
    match bench {
        Bench::Fwht {
            device,
            dtypes,
            threads,
            log2_d,
            bytes,
            reps,
        } => {
            if device == "cpu" {
                let config = bench::fwht::FwhtBenchConfig {
                    threads,
                    log2_d,
                    bytes,
                    reps,
                };
                bench::fwht::run(&config, &mut |line| print_json_line(line))?;
            } else {
                let device = whvi::device::parse_device(&device)?;
                let mut config = bench::fwht_device::DeviceFwhtBenchConfig {
                    log2_d,
                    bytes,
                    reps,
                    ..Default::default()
                };
                if !dtypes.is_empty() {
                    config.dtypes = dtypes.into_iter().map(Into::into).collect();
                }
                bench::fwht_device::run_on_device(&device, &config, &mut |line| {
                    print_json_line(line)
                })?;
            }
            Ok(())
        }
        Bench::Layers {
            sizes,
            batch,
            reps,
            threads,
        } => {
            if let Some(n) = threads {
                args::set_threads(n)?;
            }
            let mut config = bench::layers::LayerBenchConfig {
                batch,
                reps,
                ..Default::default()
            };
            if !sizes.is_empty() {
                config.sizes = sizes;
            }
            bench::layers::bench_layers(&config, print_json_line)?;
            Ok(())
        }
        Bench::Train {
            models,
            heads,
            width,
            batch,
            steps,
            conv_shapes,
            device,
            threads,
        } => {
            if let Some(n) = threads {
                args::set_threads(n)?;
            }
            let group = whvi::dist::Group::from_environment()?;
            let device = whvi::device::parse_device_for_rank(&device, group.local_rank())
                .and_then(|device| Ok((group.on_device(&device)?, device)));
            let (group, device) = device.map_err(|e| end_group_on_error(&group, e))?;
            // The network whose convolution shapes to time, if any.
            let conv_shapes = match conv_shapes.as_deref() {
                Some("none") => None,
                Some(shapes) if !device.is_cpu() => {
                    return Err(whvi::Error::invalid(format!(
                        "--conv-shapes {shapes} times the CPU convolution paths; leave it out \
                     (or pass none) with a GPU --device"
                    )));
                }
                Some(shapes) => Some(shapes.to_string()),
                None => device.is_cpu().then(|| "vgg16".to_string()),
            };
            let leader = group.is_leader();
            let config = bench::train::TrainBenchConfig {
                models,
                heads: heads.into_iter().map(Into::into).collect(),
                width,
                batch,
                steps,
                device,
                group: group.clone(),
            };
            let report = |line: &bench::train::TrainTiming| {
                if leader {
                    print_json_line(line)
                }
            };
            if let Err(e) = bench::train::bench_train(&config, report) {
                return Err(end_group_on_error(&group, e));
            }
            // The convolution shapes are timed by one process alone.
            if let Some(conv_shapes) = conv_shapes.filter(|_| group.size() == 1) {
                bench::conv::bench_conv_shapes(&conv_shapes, width, batch, steps, print_json_line)?;
            }
            Ok(())
        }
    }
}

/// A rank that fails while the others wait in a collective call would leave them hanging: it
/// says why and ends the whole job.
fn end_group_on_error(group: &whvi::dist::Group, e: whvi::Error) -> whvi::Error {
    if group.size() == 1 {
        return e;
    }
    // An interruption and a divergence reach every rank at the same batch. The first rank to
    // exit makes mpirun end the others, so each says its part before any leaves.
    // One write per message: mpirun interleaves the ranks' output write by write.
    let say = |line: String| {
        let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes());
    };
    let code = match &e {
        whvi::Error::Interrupted(message) => {
            say(format!("whvi: interrupted: {message}"));
            Some(130)
        }
        whvi::Error::Diverged(message) => {
            say(format!("whvi: error: {message}"));
            Some(1)
        }
        _ => None,
    };
    if let Some(code) = code {
        group.any(false);
        std::process::exit(code);
    }
    say(format!(
        "whvi: rank {} of {}: error: {}; ending the job (checkpoints already written stay as they are)",
        group.rank(),
        group.size(),
        e.without_backtrace()
    ));
    group.abort(1)
}

/// Prints one benchmark line as JSON.
fn print_json_line(line: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string(line).expect("a benchmark line serialises")
    );
}
