//! The `turnstile` command line: parses arguments and hands off to the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use turnstile::config::Config;
use turnstile::router::HashKind;

/// mimalloc instead of glibc's malloc: a request allocates and frees on one partition thread
/// while another thread frees what it allocated (a reply, a request), which glibc's per-thread
/// arenas serve with locks and `malloc_consolidate`; measured 1.05x the in-process throughput
/// without fsync and 1.13x with it (medians, BENCHMARKS.md, "The allocator"). Built not to
/// ask for transparent huge pages (the workspace's `no_thp`): with them every partition
/// thread's heap held a 2 MiB page, 2.7x an idle server's memory at 64 partitions, and no
/// faster. A kernel with THP `always` gives them unasked; `MIMALLOC_ALLOW_THP=0` stops that.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `println!` that hands a closed stdout (`turnstile check X | head -1`) back as an error, on
/// which `main` ends quietly, instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// `print!` with [`outln!`]'s handling of a closed stdout.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// Keyed state machines whose transition rules are WebAssembly components.
#[derive(Parser)]
#[command(name = "turnstile", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: partition threads, rule instances, HTTP API.
    Run {
        /// Configuration file (see turnstile.toml for every key).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address to listen on (overrides server.listen); port 0 picks a free one.
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Directory for durable state (overrides store.data_dir); without one, state is in memory.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Rule component (overrides rule.path); without one, the embedded reference rule.
        #[arg(long, value_name = "FILE.wasm")]
        rule: Option<PathBuf>,
    },
    /// Create a self-contained rule project (rule, scenarios, vendored SDK) that builds anywhere.
    New {
        /// Directory to create; its name is the rule's package name.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// The language to write the rule in.
        #[arg(long, value_enum, default_value = "rust")]
        lang: Lang,
    },
    /// Build a rule project (Rust crate, JavaScript package or Python app, recognised by its
    /// Cargo.toml, package.json or pyproject.toml / app.py) into the component `run --rule`
    /// accepts, and check it.
    Build {
        /// The rule project (default: the current directory).
        #[arg(value_name = "RULE_CRATE_DIR", default_value = ".")]
        crate_dir: PathBuf,
        /// Configuration whose [rule] limits the component is checked against.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Keep function names so trap backtraces name the rule's functions (bigger component).
        #[arg(long)]
        debug: bool,
        /// Cargo's target dir (default: $CARGO_TARGET_DIR, else RULE_CRATE_DIR/target); share one
        /// between rules to compile the SDK's dependencies once.
        #[arg(long, value_name = "DIR")]
        target_dir: Option<PathBuf>,
        /// Also write the component to this file.
        #[arg(long, value_name = "FILE.wasm")]
        out: Option<PathBuf>,
    },
    /// Run scenario files against a rule, exactly as production would run it.
    Test {
        /// The rule component.
        #[arg(value_name = "RULE.wasm")]
        rule: PathBuf,
        /// Scenario files (TOML).
        #[arg(value_name = "SCENARIOS.toml", required = true)]
        scenarios: Vec<PathBuf>,
        /// Also write the results as JUnit XML.
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
        /// Production configuration to start from (scenario files may override parts).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Run only the scenarios whose name contains this text.
        #[arg(long, value_name = "TEXT")]
        filter: Option<String>,
        /// Show the rule's log lines for every step (by default only for failing steps).
        #[arg(long)]
        nocapture: bool,
        /// Rebuild this rule crate into RULE.wasm and rerun whenever it or a scenario file
        /// changes, until interrupted.
        #[arg(long, value_name = "RULE_CRATE_DIR")]
        watch: Option<PathBuf>,
    },
    /// Replay a data dir's log through a candidate rule and report what it would decide differently.
    Replay {
        /// The data dir (only read; the server may be stopped, or use a copy).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The candidate rule component.
        #[arg(long, value_name = "CANDIDATE.wasm")]
        rule: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// How many differences to show in full.
        #[arg(long, default_value_t = 5)]
        examples: usize,
        /// Configuration whose [rule] limits the candidate runs under.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Exit with 2 when any decision differs (the candidate's failures included).
        #[arg(long)]
        fail_on_diff: bool,
        /// Exit with 3 when the candidate fails (traps, runs out of fuel, ...) on any request.
        #[arg(long)]
        fail_on_error: bool,
        /// Also write the result as JUnit XML (one test case per logged rule version).
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
    },
    /// Measure throughput and latency, in process or over HTTP, against the baselines.
    Bench {
        /// Partitions (the baselines use as many worker threads).
        #[arg(long, default_value_t = 4)]
        partitions: u32,
        /// Users; each sends reserve then associate.
        #[arg(long, default_value_t = 50_000)]
        users: u64,
        /// Concurrent clients (over HTTP: connections, in open loop too).
        #[arg(long, default_value_t = 256)]
        clients: usize,
        /// Store durability.
        #[arg(long, default_value = "sync", value_parser = ["sync", "none"])]
        durability: String,
        /// Most requests per group commit.
        #[arg(long, default_value_t = 256)]
        max_batch: usize,
        /// Rule component (default: the embedded reference rule).
        #[arg(long, value_name = "FILE.wasm")]
        rule: Option<PathBuf>,
        /// Also run the baselines: native rule, lock-based workers, unordered workers.
        #[arg(long)]
        compare: bool,
        /// Drive running servers over HTTP instead; several URLs, comma-separated, spread the
        /// clients over the processes of a cluster.
        #[arg(long, value_name = "URL[,URL...]")]
        url: Option<String>,
        /// `pairs`: each user's reserve then associate from one client; `race`: a user's
        /// reserve and associate at once from two clients, `--rounds` times, judged by an oracle.
        #[arg(long, default_value = "pairs", value_parser = ["pairs", "race"])]
        workload: String,
        /// Race workload: how many times each user's two requests are sent.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Open loop: requests per second, scheduled whatever the answers (latency from each
        /// request's scheduled time); several, comma-separated, give one row each.
        #[arg(long, value_name = "R[,R...]", value_delimiter = ',')]
        rate: Vec<f64>,
        /// After each in-process Turnstile run, time reopening its data dir (start to ready with
        /// every key the run wrote).
        #[arg(long)]
        restart: bool,
        /// In process: skew the load over the partitions by a Zipf law of exponent S (partition
        /// 0 the hottest; each user keeps a key of its own), and report the hottest partition's
        /// p99 against the others'.
        #[arg(long, value_name = "S")]
        zipf: Option<f64>,
        /// Kafka mode: be the outside producer of the cluster this configuration file describes
        /// (its processes must be running), and compare with a pass-through pipe on the same
        /// broker.
        #[arg(long, value_name = "CLUSTER.toml")]
        kafka: Option<PathBuf>,
        /// With --kafka or --url: processes whose CPU time per request to report, as LABEL=PID
        /// (e.g. broker=123, server=456).
        #[arg(long, value_name = "LABEL=PID", value_delimiter = ',')]
        cpu: Vec<String>,
        /// Kafka mode: skip the pass-through floor.
        #[arg(long)]
        no_floor: bool,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The pass-through pipe `bench --kafka` measures as its floor (started by the bench).
    #[command(hide = true)]
    BenchPipe {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        requests_topic: String,
        #[arg(long)]
        outcomes_topic: String,
        #[arg(long)]
        changelog_topic: String,
        #[arg(long)]
        partitions: u32,
    },
    /// Move a stopped data dir to another partition count or hash, all or nothing.
    Repartition {
        /// The data dir (the server must be stopped).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Servers in the new layout.
        #[arg(long)]
        servers: u32,
        /// Containers per server in the new layout.
        #[arg(long)]
        containers: u32,
        /// Hash of the new layout (default: the data dir's current one).
        #[arg(long, value_parser = ["java", "murmur2"])]
        hash: Option<String>,
    },
    /// Take an online, consistent backup of a running server into a new data dir (on the
    /// server's host), without stopping traffic; usable by `run --data-dir` and `replay`.
    Backup {
        /// The server, e.g. http://127.0.0.1:8080.
        #[arg(long, value_name = "URL")]
        url: String,
        /// The directory to write, as the server sees it: new, or empty.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The admin token (default: $TURNSTILE_ADMIN_TOKEN).
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
    },
    /// Check every record of a stopped data dir for damage; exits 1 naming each damaged file and key.
    Verify {
        /// The data dir (the server must be stopped).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Remove the damaged records found (giving them up; see README, Data dir) instead of
        /// only listing them. Damage of a file's structure is left for a restore.
        #[arg(long)]
        drop_damaged: bool,
    },
    /// Print the records of a stopped data dir as JSON lines (one object a line:
    /// partition, table, key, value), whatever their encoding on disk; or, with --changelog,
    /// the records of a Kafka-mode cluster's changelog topic (partition, offset, key, format,
    /// record), read from the broker without joining the cluster.
    Inspect {
        /// The data dir (the server must be stopped).
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "changelog",
            conflicts_with = "changelog"
        )]
        data_dir: Option<PathBuf>,
        /// Read the changelog topic of the cluster this configuration (with a [kafka]
        /// section) names, from its start to the end the broker has now.
        #[arg(long, value_name = "CONFIG")]
        changelog: Option<PathBuf>,
        /// Only this partition.
        #[arg(long, value_name = "P")]
        partition: Option<u32>,
        /// Only this table: states, routes, dedup, dedup_order, log, dead_letters, meta,
        /// checkpoints (data dir only).
        #[arg(long, value_name = "T", conflicts_with = "changelog")]
        table: Option<String>,
        /// Only this key (a sequence number for log, dead_letters and dedup_order; with
        /// --changelog, a Kafka key such as state/<key>, route/<user> or dedup/<id>).
        #[arg(long, value_name = "K")]
        key: Option<String>,
    },
    /// Check a rule component against the world and the limits, without running a server.
    Check {
        /// The component file.
        #[arg(value_name = "RULE.wasm")]
        rule: PathBuf,
        /// Configuration whose [rule] limits the component is checked against.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

/// The languages `turnstile new --lang` writes a rule project in.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Lang {
    /// A Rust crate with the `turnstile-rule` SDK.
    Rust,
    /// An npm package built with componentize-js.
    Js,
    /// A Python app built with componentize-py.
    Python,
}

/// A release gate of `turnstile replay` that tripped: the report is printed, the exit code says
/// which gate (documented in README: 2 differences, 3 candidate failures).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct GateTripped {
    /// The process exit code.
    code: u8,
    /// What tripped it.
    message: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = run(cli);
    turnstile::logging::flush(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<GateTripped>().is_some() => {
            let gate = e.downcast_ref::<GateTripped>().expect("checked above");
            eprintln!("error: {}", gate.message);
            ExitCode::from(gate.code)
        }
        // The reader of stdout went away (`| head`): what it wanted, it got.
        Err(e)
            if e.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    })
}

/// One `turnstile test` run: results, failures, coverage, JUnit, summary; an error when any
/// scenario failed.
fn test_once(
    rule: &Path,
    scenarios: &[PathBuf],
    config: &Config,
    options: &turnstile::scenario::RunOptions,
    junit: Option<&Path>,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(rule).with_context(|| format!("reading {}", rule.display()))?;
    let report = turnstile::scenario::run(&bytes, scenarios, config, options, &mut |line| {
        // A closed stdout is noticed by the summary's `outln!` once the run ends.
        let _ = std::io::Write::write_fmt(&mut std::io::stdout().lock(), format_args!("{line}\n"));
    })?;
    if report.results.is_empty() {
        anyhow::bail!(
            "no scenario matches --filter {:?} ({} filtered out)",
            options.filter.clone().unwrap_or_default(),
            report.filtered_out
        );
    }
    let failures: Vec<_> = report
        .results
        .iter()
        .filter(|r| r.failure.is_some())
        .collect();
    if !failures.is_empty() {
        outln!("\nfailures:\n");
        for r in &failures {
            outln!("---- {} ({}) ----", r.name, r.at);
            outln!("{}", r.failure.as_deref().unwrap_or_default());
        }
    }
    outln!("\ncoverage (status before, kind) → outcomes seen:");
    for line in turnstile::scenario::coverage_lines(&report.coverage) {
        outln!("{line}");
    }
    if !report.never_ran.is_empty() {
        outln!("\nnever ran (declared in [coverage]):");
        for (from, kind) in &report.never_ran {
            outln!("  ({from}, {kind})");
        }
    }
    if let Some(path) = junit {
        std::fs::write(path, turnstile::scenario::junit(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    outln!();
    outln!(
        "scenarios: {} passed, {} failed, {} filtered out",
        report.passed(),
        report.failed(),
        report.filtered_out
    );
    if report.failed() > 0 {
        anyhow::bail!("{} scenario(s) failed", report.failed());
    }
    Ok(())
}

/// The newest modification time under `paths` (files, and directories walked recursively), so
/// watch mode sees an edit, a new file or a removed one (the directory's own time changes).
fn newest_change(paths: &[PathBuf]) -> std::time::SystemTime {
    let mut newest = std::time::UNIX_EPOCH;
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if let Ok(modified) = meta.modified() {
            newest = newest.max(modified);
        }
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    newest
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // `run` and `test` set up logging from their configuration; every other command shows the
    // host's warnings (a compile cache that is not used, say) and errors on stderr.
    if !matches!(cli.command, Command::Run { .. } | Command::Test { .. }) {
        turnstile::logging::init("warn").context("setting up logging")?;
    }
    match cli.command {
        Command::New { dir, lang } => {
            let language = match lang {
                Lang::Rust => turnstile::toolkit::Language::Rust,
                Lang::Js => turnstile::toolkit::Language::JavaScript,
                Lang::Python => turnstile::toolkit::Language::Python,
            };
            let name = turnstile::toolkit::new_project(&dir, language)?;
            outln!("created rule `{name}` in {}", dir.display());
            let install = match lang {
                Lang::Rust => "",
                Lang::Js => "npm install && ",
                Lang::Python => {
                    "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && "
                }
            };
            outln!(
                "next: cd {} && {install}turnstile build . && turnstile test target/components/{name}.wasm scenarios.toml",
                dir.display()
            );
            Ok(())
        }
        Command::Build {
            crate_dir,
            config,
            debug,
            target_dir,
            out,
        } => {
            let options = turnstile::toolkit::BuildOptions {
                debug,
                target_dir,
                out,
            };
            let built =
                turnstile::toolkit::build(&crate_dir, &load_config(config.as_ref())?, &options)?;
            outln!("built {}", built.path.display());
            outln!("version {}", built.rule.version);
            outln!("size {} bytes", built.rule.size);
            Ok(())
        }
        Command::Test {
            rule,
            scenarios,
            junit,
            config,
            filter,
            nocapture,
            watch,
        } => {
            let config = load_config(config.as_ref())?;
            turnstile::logging::init_for_rule_tests(&config.log.level)
                .context("setting up logging")?;
            let options = turnstile::scenario::RunOptions { filter, nocapture };
            let Some(crate_dir) = watch else {
                return test_once(&rule, &scenarios, &config, &options, junit.as_deref());
            };
            // Watch mode: rebuild (when the crate has changed) and rerun until interrupted.
            let mut watched = scenarios.clone();
            watched.push(crate_dir.join("Cargo.toml"));
            watched.push(crate_dir.join("src"));
            let mut last = None;
            loop {
                let stamp = newest_change(&watched);
                if last != Some(stamp) {
                    last = Some(stamp);
                    let built = turnstile::toolkit::build(
                        &crate_dir,
                        &config,
                        &turnstile::toolkit::BuildOptions {
                            out: Some(rule.clone()),
                            ..Default::default()
                        },
                    );
                    let outcome = built.and_then(|_| {
                        test_once(&rule, &scenarios, &config, &options, junit.as_deref())
                    });
                    if let Err(e) = outcome {
                        outln!("error: {e:#}");
                    }
                    outln!(
                        "\nwatching {} for changes (Ctrl-C to stop)",
                        crate_dir.display()
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
        }
        Command::Replay {
            data_dir,
            rule,
            json,
            examples,
            config,
            fail_on_diff,
            fail_on_error,
            junit,
        } => {
            let config = load_config(config.as_ref())?;
            let bytes =
                std::fs::read(&rule).with_context(|| format!("reading {}", rule.display()))?;
            let mut bar = turnstile::progress::Progress::new("replaying");
            let report = turnstile::replay::replay(
                &data_dir,
                &bytes,
                &config,
                examples,
                &mut |done, total| bar.update(done, total),
            )?;
            bar.finish();
            if json {
                outln!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                out!("{}", turnstile::replay::render(&report, &data_dir));
            }
            if let Some(path) = junit {
                std::fs::write(&path, turnstile::replay::junit(&report))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if fail_on_error && report.errors > 0 {
                return Err(GateTripped {
                    code: 3,
                    message: format!(
                        "--fail-on-error: the candidate failed on {} of {} requests",
                        report.errors, report.decisions
                    ),
                }
                .into());
            }
            if fail_on_diff && report.different > 0 {
                return Err(GateTripped {
                    code: 2,
                    message: format!(
                        "--fail-on-diff: {} of {} decisions differ",
                        report.different, report.decisions
                    ),
                }
                .into());
            }
            Ok(())
        }
        Command::Bench {
            partitions,
            users,
            clients,
            durability,
            max_batch,
            rule,
            compare,
            url,
            workload,
            rounds,
            rate,
            restart,
            zipf,
            kafka,
            cpu,
            no_floor,
            json,
        } => {
            let cpu = cpu
                .iter()
                .map(|item| {
                    let (label, pid) = item
                        .split_once('=')
                        .and_then(|(label, pid)| {
                            Some((label.to_string(), pid.parse::<u32>().ok()?))
                        })
                        .with_context(|| format!("--cpu {item:?}: expected LABEL=PID"))?;
                    // An unreadable process would read as 0 µs per request.
                    std::fs::metadata(format!("/proc/{pid}/stat"))
                        .with_context(|| format!("--cpu {item:?}: no process {pid}"))?;
                    Ok((label, pid))
                })
                .collect::<anyhow::Result<Vec<(String, u32)>>>()?;
            anyhow::ensure!(
                cpu.is_empty() || kafka.is_some() || url.is_some(),
                "--cpu reports other processes' CPU time, so it needs --url or --kafka"
            );
            if let Some(exponent) = zipf {
                anyhow::ensure!(
                    exponent.is_finite() && exponent > 0.0,
                    "--zipf must be a positive exponent"
                );
                anyhow::ensure!(
                    url.is_none() && kafka.is_none(),
                    "--zipf places keys by the bench's own partitions, so it runs in process only"
                );
            }
            if let Some(path) = kafka {
                let options = turnstile::bench::kafka::KafkaBenchOptions {
                    config: Config::load(&path)?,
                    users,
                    rates: rate,
                    cpu,
                    floor: !no_floor,
                    idle_timeout: std::time::Duration::from_secs(30),
                };
                let mut bar = turnstile::progress::Progress::new("bench");
                let rows = turnstile::bench::kafka::run(&options, &mut |done, total| {
                    bar.update(done, total)
                })?;
                bar.finish();
                if json {
                    outln!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    out!("{}", turnstile::bench::kafka::render(&rows, &options));
                }
                return Ok(());
            }
            anyhow::ensure!(
                rate.iter().all(|r| r.is_finite() && *r > 0.0),
                "--rate must be positive"
            );
            anyhow::ensure!(rounds >= 1, "--rounds must be at least 1");
            anyhow::ensure!(partitions >= 2, "--partitions must be at least 2");
            anyhow::ensure!(
                users >= 1 && clients >= 1,
                "--users and --clients must be at least 1"
            );
            let options = turnstile::bench::BenchOptions {
                partitions,
                users,
                clients,
                durability: if durability == "none" {
                    turnstile::config::Durability::None
                } else {
                    turnstile::config::Durability::Sync
                },
                max_batch,
                rule: rule
                    .map(|p| std::fs::read(&p).with_context(|| format!("reading {}", p.display())))
                    .transpose()?,
                compare,
                workload: if workload == "race" {
                    turnstile::bench::Workload::Race { rounds }
                } else {
                    turnstile::bench::Workload::Pairs
                },
                rates: rate,
                url: url.map(|list| {
                    list.split(',')
                        .map(|u| u.trim().trim_end_matches('/').to_string())
                        .filter(|u| !u.is_empty())
                        .collect()
                }),
                restart,
                cpu,
                zipf,
            };
            let mut bar = turnstile::progress::Progress::new("bench");
            let rows = turnstile::bench::run(&options, &mut |done, total| bar.update(done, total))?;
            bar.finish();
            if json {
                outln!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                out!("{}", turnstile::bench::render(&rows, &options));
            }
            Ok(())
        }
        Command::BenchPipe {
            brokers,
            requests_topic,
            outcomes_topic,
            changelog_topic,
            partitions,
        } => turnstile::bench::kafka::pipe(
            &brokers,
            &requests_topic,
            &outcomes_topic,
            &changelog_topic,
            partitions,
        ),
        Command::Repartition {
            data_dir,
            servers,
            containers,
            hash,
        } => {
            let hash = match hash.as_deref() {
                Some("murmur2") => HashKind::Murmur2,
                Some(_) => HashKind::Java,
                None => turnstile::store::read_layout(&data_dir)?
                    .map(|l| l.hash)
                    .with_context(|| {
                        format!("{} is not a turnstile data dir", data_dir.display())
                    })?,
            };
            let partitions = servers
                .checked_mul(containers)
                .filter(|n| *n >= 2)
                .context("--servers × --containers must be at least 2")?;
            let report =
                turnstile::repartition::repartition(&data_dir, partitions, hash, &mut |line| {
                    eprintln!("{line}");
                })?;
            outln!(
                "repartitioned {}: {} → {} partitions ({} → {}), {} states, {} routes, {} dedup entries, {} log entries, {} dead letters written ({} older routes and dedup entries superseded) in {:.2?}",
                data_dir.display(),
                report.old.partitions,
                report.new.partitions,
                report.old.hash.name(),
                report.new.hash.name(),
                report.states,
                report.routes,
                report.dedup,
                report.log,
                report.dead_letters,
                report.superseded,
                report.elapsed
            );
            if let Some(version) = &report.rule_version {
                outln!("every partition runs rule version {version}");
            }
            Ok(())
        }
        Command::Backup { url, out, token } => {
            let token = token
                .or_else(|| std::env::var("TURNSTILE_ADMIN_TOKEN").ok())
                .context("the admin token is needed: --token or TURNSTILE_ADMIN_TOKEN")?;
            let status = turnstile::backup::run_client(&url, &out, &token)?;
            outln!(
                "backup {}: {} partitions, {} records",
                out.display(),
                status.partitions_done,
                status.records
            );
            Ok(())
        }
        Command::Verify {
            data_dir,
            drop_damaged: true,
        } => {
            let (reports, removed) = turnstile::verify::drop_damaged(&data_dir)?;
            out!("{}", turnstile::verify::render(&reports));
            outln!("removed {removed} damaged records");
            if reports
                .iter()
                .any(|r| r.damage.iter().any(|d| d.key.is_none()))
            {
                anyhow::bail!(
                    "a partition file's structure is damaged; {}",
                    turnstile::store::DAMAGE_RECOVERY
                );
            }
            Ok(())
        }
        Command::Verify { data_dir, .. } => {
            let reports = turnstile::verify::verify(&data_dir)?;
            out!("{}", turnstile::verify::render(&reports));
            let damaged = reports.iter().filter(|r| !r.damage.is_empty()).count();
            if damaged > 0 {
                anyhow::bail!(
                    "{damaged} of {} partition files are damaged; {}",
                    reports.len(),
                    turnstile::store::DAMAGE_RECOVERY
                );
            }
            Ok(())
        }
        Command::Inspect {
            data_dir,
            changelog,
            partition,
            table,
            key,
        } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            if let Some(config) = changelog {
                let config = load_config(Some(&config))?;
                let read = turnstile::kafka::inspect::inspect_changelog(
                    &config,
                    partition,
                    key.as_deref(),
                    &mut out,
                )?;
                eprintln!(
                    "read {} records from {} partitions of {} ({} undecodable)",
                    read.records, read.partitions, read.topic, read.undecodable
                );
                return Ok(());
            }
            let data_dir = data_dir.context("--data-dir or --changelog is needed")?;
            let filter = turnstile::store::inspect::Filter {
                partition,
                table,
                key,
            };
            turnstile::store::inspect::inspect(&data_dir, &filter, &mut out)?;
            Ok(())
        }
        Command::Check { rule, config } => {
            let checked = turnstile::toolkit::check(&rule, &load_config(config.as_ref())?)?;
            outln!("ok {}", rule.display());
            outln!("version {}", checked.version);
            outln!("size {} bytes", checked.size);
            outln!("functions {}", checked.functions);
            outln!("imports {}", checked.imports.join(", "));
            outln!("exports {}", checked.exports.join(", "));
            Ok(())
        }
        Command::Run {
            config,
            listen,
            data_dir,
            rule,
        } => {
            let mut config = load_config(config.as_ref())?;
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            if let Some(dir) = data_dir {
                config.store.data_dir = Some(dir);
            }
            if let Some(rule) = rule {
                config.rule.path = Some(rule);
            }
            turnstile::logging::init(&config.log.level).context("setting up logging")?;
            if config.store.data_dir.is_none() && config.kafka.is_none() {
                tracing::warn!(
                    "no data dir: state is kept in memory and lost on exit (use --data-dir)"
                );
            }
            turnstile::server::serve(config)
        }
    }
}
