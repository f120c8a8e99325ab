//! `cohort-sim-kad`: Kademlia provider lookups at scale; hops and requests against log2(N).
//!
//! ```text
//! cohort-sim-kad [--nodes N] [--lookups L] [--k K] [--alpha A] [--seed S]
//! ```

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Instant;

use cohort_sim::{KadConfig, run_kademlia};

const USAGE: &str = "\
usage: cohort-sim-kad [--nodes N] [--lookups L] [--k K] [--alpha A] [--seed S]

Runs iterative Kademlia provider lookups over converged routing tables and reports hops,
rounds and requests per lookup next to log2(N).

  --nodes N     peers (more than k; default 1000)
  --lookups L   lookups, each for a random key from a random peer (default 1000)
  --k K         bucket size and replication factor (default 20, as libp2p)
  --alpha A     requests in flight per lookup (default 3, as libp2p)
  --seed S      run seed, an unsigned 64-bit integer (default 0)
  -h, --help    print this help";

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<KadConfig>, String> {
    let mut config = KadConfig::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg, None),
        };
        let slot: &mut dyn FnMut(&str) -> Result<(), String> = &mut |v: &str| {
            let parse = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("{flag}: cannot parse {v:?}"))
            };
            match flag.as_str() {
                "--nodes" => config.nodes = parse(v)? as usize,
                "--lookups" => config.lookups = parse(v)? as usize,
                "--k" => config.k = parse(v)? as usize,
                "--alpha" => config.alpha = parse(v)? as usize,
                "--seed" => config.seed = parse(v)?,
                _ => return Err(format!("unknown argument {flag:?}")),
            }
            Ok(())
        };
        let value = match inline {
            Some(v) => v,
            None => match args.next() {
                Some(v) => v,
                None => return Err(format!("{flag}: missing value")),
            },
        };
        slot(&value)?;
    }
    Ok(Some(config))
}

fn main() -> ExitCode {
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(Some(c)) => c,
        Ok(None) => return write_or_fail(USAGE),
        Err(message) => {
            eprintln!("cohort-sim-kad: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    match run_kademlia(config) {
        Ok(report) => write_or_fail(&format!(
            "{report}\nwall time        {:.2}s",
            started.elapsed().as_secs_f64()
        )),
        Err(e) => {
            eprintln!("cohort-sim-kad: {e}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn write_or_fail(text: &str) -> ExitCode {
    match writeln!(std::io::stdout().lock(), "{text}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cohort-sim-kad: writing to stdout: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<KadConfig>, String> {
        parse_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn flags_and_errors() {
        let c = parse(&["--nodes", "50", "--k=4", "--seed", "9"])
            .unwrap()
            .unwrap();
        assert_eq!((c.nodes, c.k, c.alpha, c.seed), (50, 4, 3, 9));
        assert_eq!(parse(&["-h"]), Ok(None));
        assert_eq!(
            parse(&["--nodes", "x"]),
            Err("--nodes: cannot parse \"x\"".into())
        );
        assert_eq!(
            parse(&["--fanout", "3"]),
            Err("unknown argument \"--fanout\"".into())
        );
        assert_eq!(parse(&["--k"]), Err("--k: missing value".into()));
    }
}
