//! `cohort-sim`: runs a rounds scenario file, or the gossip flood scenario, and prints its report
//! and the simulator's speed.
//!
//! ```text
//! cohort-sim SCENARIO.toml [--out DIR]
//! cohort-sim [--nodes N] [--degree D] [--seed S] [--adversaries FRACTION]
//! ```

use std::io::Write as _;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Instant;

use std::path::{Path, PathBuf};

use cohort_sim::rounds::{Scenario, run_scenario};
use cohort_sim::{Flood, FloodConfig};

const USAGE: &str = "\
usage: cohort-sim SCENARIO.toml [--out DIR]
       cohort-sim [--nodes N] [--degree D] [--seed S] [--adversaries FRACTION]

The first form runs a federated-rounds scenario (see simulations/scenarios/): prints a summary
and writes CSV files and SVG charts into DIR (default: out/NAME next to the scenarios folder).
A relative SCENARIO path that does not exist is also looked up in the cohort-sim crate.

Floods one signed announcement through a random overlay in virtual time and reports coverage,
traffic, rejections and hop counts.

  --nodes N                peers (at least 2; default 1000)
  --degree D               overlay degree, 2..N-1 (default 6)
  --seed S                 run seed, an unsigned 64-bit integer (default 0)
  --adversaries FRACTION   fraction of peers that corrupt what they forward, 0 <= F < 1 (default 0)
  -h, --help               print this help";

/// What the command line asked for.
enum Command {
    Help,
    Run(FloodConfig),
}

fn parse_value<T: FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{flag}: cannot parse {value:?}"))
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut config = FloodConfig {
        nodes: 1_000,
        ..FloodConfig::default()
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        // Both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        if !matches!(
            flag.as_str(),
            "--nodes" | "--degree" | "--seed" | "--adversaries"
        ) {
            return Err(format!("unknown argument {flag:?}"));
        }
        let value = match inline {
            Some(v) => v,
            None => args
                .next()
                .ok_or_else(|| format!("{flag}: missing value"))?,
        };
        match flag.as_str() {
            "--nodes" => config.nodes = parse_value(&flag, &value)?,
            "--degree" => config.degree = parse_value(&flag, &value)?,
            "--seed" => config.seed = parse_value(&flag, &value)?,
            _ => config.adversary_fraction = parse_value(&flag, &value)?,
        }
    }
    Ok(Command::Run(config))
}

/// Runs a rounds scenario file: summary on stdout, files into the output folder.
fn run_scenario_file(args: &[String]) -> ExitCode {
    let mut path = PathBuf::from(&args[0]);
    if !path.exists() && path.is_relative() {
        let in_crate = Path::new(env!("CARGO_MANIFEST_DIR")).join(&path);
        if in_crate.exists() {
            path = in_crate;
        }
    }
    let out = match args.get(1..) {
        Some([flag, dir]) if flag == "--out" => Some(PathBuf::from(dir)),
        Some([]) | None => None,
        Some(_) => {
            eprintln!("cohort-sim: after the scenario only --out DIR is accepted\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(err) => {
            eprintln!("cohort-sim: reading {}: {err}", path.display());
            return ExitCode::from(2);
        }
    };
    let scenario = match Scenario::parse(&text) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("cohort-sim: {}: {err}", path.display());
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let report = match run_scenario(&scenario) {
        Ok(r) => r,
        Err(err) => {
            eprintln!("cohort-sim: {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let wall = started.elapsed();
    let dir = out.unwrap_or_else(|| {
        path.parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."))
            .join("out")
            .join(&scenario.name)
    });
    let files = match report.write(&dir) {
        Ok(f) => f,
        Err(err) => {
            eprintln!("cohort-sim: writing {}: {err}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    let events: u64 = report.runs.iter().map(|r| r.events).sum();
    let loop_wall: f64 = report.runs.iter().map(|r| r.run_wall.as_secs_f64()).sum();
    write_or_fail(&format!(
        "{}\nwall time {:.2}s ({} events, {:.0} events/s in the event loops)\nwrote {} files into {}",
        report.summary(),
        wall.as_secs_f64(),
        events,
        events as f64 / loop_wall.max(1e-9),
        files.len(),
        dir.display()
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a.ends_with(".toml")) {
        return run_scenario_file(&args);
    }
    let config = match parse_args(args) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Help) => return write_or_fail(USAGE),
        Err(message) => {
            eprintln!("cohort-sim: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };

    let started = Instant::now();
    let mut flood = match Flood::new(config) {
        Ok(flood) => flood,
        Err(err) => {
            eprintln!("cohort-sim: {err}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let setup = started.elapsed();
    let started = Instant::now();
    let report = flood.run();
    let run = started.elapsed();

    let events_per_sec = report.events as f64 / run.as_secs_f64().max(1e-9);
    write_or_fail(&format!(
        "{report}\nwall time        setup {:.3}s (keys, overlay, signing), run {:.3}s: {:.0} events/s",
        setup.as_secs_f64(),
        run.as_secs_f64(),
        events_per_sec
    ))
}

fn write_or_fail(text: &str) -> ExitCode {
    match writeln!(std::io::stdout().lock(), "{text}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cohort-sim: writing to stdout: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn flags_in_both_forms() {
        let Ok(Command::Run(c)) = parse(&[
            "--nodes",
            "50",
            "--degree=4",
            "--seed",
            "9",
            "--adversaries=0.25",
        ]) else {
            panic!("expected a run");
        };
        assert_eq!(
            (c.nodes, c.degree, c.seed, c.adversary_fraction),
            (50, 4, 9, 0.25)
        );
        let Ok(Command::Run(d)) = parse(&[]) else {
            panic!("expected a run");
        };
        assert_eq!(d.nodes, 1_000);
        assert!(matches!(parse(&["--seed", "1", "-h"]), Ok(Command::Help)));
    }

    #[test]
    fn bad_input_says_what_is_wrong() {
        let err = |args: &[&str]| parse(args).err().unwrap();
        assert_eq!(err(&["--nodes", "many"]), "--nodes: cannot parse \"many\"");
        assert_eq!(err(&["--degree"]), "--degree: missing value");
        assert_eq!(err(&["--fanout", "3"]), "unknown argument \"--fanout\"");
        assert_eq!(err(&["--seed=-1"]), "--seed: cannot parse \"-1\"");
    }
}
