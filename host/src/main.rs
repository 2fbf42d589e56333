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
    match run(cli) {
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
                "repartitioned {}: {} → {} partitions ({} → {}), {} states, {} routes, {} dedup entries, {} log entries, {} dead letters in {:.2?}",
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
                report.elapsed
            );
            Ok(())
        }
        Command::Check { rule, config } => {
            let checked = turnstile::toolkit::check(&rule, &load_config(config.as_ref())?)?;
            println!("ok {}", rule.display());
            println!("version {}", checked.version);
            println!("size {} bytes", checked.size);
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
            if config.store.data_dir.is_none() {
                tracing::warn!(
                    "no data dir: state is kept in memory and lost on exit (use --data-dir)"
                );
            }
            turnstile::server::serve(config)
        }
    }
}
