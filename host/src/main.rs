//! The `turnstile` command line: parses arguments and hands off to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use turnstile::config::Config;
use turnstile::router::HashKind;

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
    /// Build a rule crate into the component `run --rule` accepts, and check it.
    Build {
        /// The rule crate (default: the current directory).
        #[arg(value_name = "RULE_CRATE_DIR", default_value = ".")]
        crate_dir: PathBuf,
        /// Configuration whose [rule] limits the component is checked against.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
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
    },
    /// Measure throughput and latency, in process or over HTTP, against the baselines.
    Bench {
        /// Partitions (the baselines use as many worker threads).
        #[arg(long, default_value_t = 4)]
        partitions: u32,
        /// Users; each sends reserve then associate.
        #[arg(long, default_value_t = 50_000)]
        users: u64,
        /// Concurrent clients.
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
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
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
    /// Check every record of a stopped data dir for damage; exits 1 naming each damaged file and key.
    Verify {
        /// The data dir (the server must be stopped).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = run(cli);
    turnstile::logging::flush(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Build { crate_dir, config } => {
            let built = turnstile::toolkit::build(&crate_dir, &load_config(config.as_ref())?)?;
            println!("built {}", built.path.display());
            println!("version {}", built.rule.version);
            println!("size {} bytes", built.rule.size);
            Ok(())
        }
        Command::Test {
            rule,
            scenarios,
            junit,
            config,
        } => {
            let config = load_config(config.as_ref())?;
            let bytes =
                std::fs::read(&rule).with_context(|| format!("reading {}", rule.display()))?;
            let report = turnstile::scenario::run(&bytes, &scenarios, &config, &mut |line| {
                println!("{line}");
            })?;
            let failures: Vec<_> = report
                .results
                .iter()
                .filter(|r| r.failure.is_some())
                .collect();
            if !failures.is_empty() {
                println!("\nfailures:\n");
                for r in &failures {
                    println!("---- {} ({}) ----", r.name, r.file.display());
                    println!("{}", r.failure.as_deref().unwrap_or_default());
                }
            }
            println!("\ncoverage (status before, kind) → outcomes seen:");
            for line in turnstile::scenario::coverage_lines(&report.coverage) {
                println!("{line}");
            }
            if let Some(path) = junit {
                std::fs::write(&path, turnstile::scenario::junit(&report))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            println!();
            println!(
                "scenarios: {} passed, {} failed",
                report.passed(),
                report.failed()
            );
            if report.failed() > 0 {
                anyhow::bail!("{} scenario(s) failed", report.failed());
            }
            Ok(())
        }
        Command::Replay {
            data_dir,
            rule,
            json,
            examples,
            config,
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
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", turnstile::replay::render(&report, &data_dir));
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
            json,
        } => {
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
            };
            let mut bar = turnstile::progress::Progress::new("bench");
            let rows = turnstile::bench::run(&options, &mut |done, total| bar.update(done, total))?;
            bar.finish();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", turnstile::bench::render(&rows, &options));
            }
            Ok(())
        }
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
            println!(
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
                println!("every partition runs rule version {version}");
            }
            Ok(())
        }
        Command::Verify { data_dir } => {
            let reports = turnstile::verify::verify(&data_dir)?;
            print!("{}", turnstile::verify::render(&reports));
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
        Command::Check { rule, config } => {
            let checked = turnstile::toolkit::check(&rule, &load_config(config.as_ref())?)?;
            println!("ok {}", rule.display());
            println!("version {}", checked.version);
            println!("size {} bytes", checked.size);
            println!("functions {}", checked.functions);
            println!("imports {}", checked.imports.join(", "));
            println!("exports {}", checked.exports.join(", "));
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
