//! The `cohort` command as a user runs it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cohort_protocol::PeerId;
use cohort_tests::{cohort, cohort_bin, failure, success};

#[test]
fn help_lists_the_subcommands_that_exist() {
    let out = success(
        std::process::Command::new(cohort_bin())
            .arg("--help")
            .output()
            .unwrap(),
    );
    for sub in [
        "init", "id", "hash", "up", "status", "sync", "datanet", "bench",
    ] {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(sub)),
            "`cohort --help` does not list {sub}:\n{out}"
        );
    }
}

#[test]
fn init_creates_a_peer_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("peer");
    let first = success(cohort(&dir).arg("init").output().unwrap());
    let id: PeerId = first.trim().parse().expect("init prints the peer id");
    assert!(dir.join("peer.key").exists() && dir.join("meta").is_dir());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join("peer.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let second = success(cohort(&dir).arg("init").output().unwrap());
    assert_eq!(second.trim(), id.to_string());
    assert_eq!(
        success(cohort(&dir).arg("id").output().unwrap()).trim(),
        id.to_string()
    );
}

#[test]
fn id_on_an_uninitialised_directory_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let err = failure(cohort(tmp.path()).arg("id").output().unwrap());
    assert!(err.contains("cohort init"), "{err}");
}

#[cfg(unix)]
#[test]
fn a_world_readable_key_is_refused_naming_the_file() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().unwrap();
    success(cohort(tmp.path()).arg("init").output().unwrap());
    let key = tmp.path().join("peer.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = failure(cohort(tmp.path()).arg("id").output().unwrap());
    assert!(
        err.contains(&key.display().to_string()) && err.contains("chmod 600"),
        "{err}"
    );
}

#[test]
fn a_malformed_key_is_refused_naming_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    success(cohort(tmp.path()).arg("init").output().unwrap());
    let key = tmp.path().join("peer.key");
    std::fs::write(&key, "cohort-secret-key-v1\nnot hex\n").unwrap();
    let err = failure(cohort(tmp.path()).arg("id").output().unwrap());
    assert!(
        err.contains(&key.display().to_string()) && err.contains("line 2"),
        "{err}"
    );
}

#[test]
fn hash_prints_blake3() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("abc.txt");
    std::fs::write(&file, "abc").unwrap();
    let out = success(cohort(tmp.path()).arg("hash").arg(&file).output().unwrap());
    // BLAKE3("abc"), from the BLAKE3 reference implementation.
    assert!(
        out.starts_with("6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85  "),
        "{out}"
    );
    let err = failure(
        cohort(tmp.path())
            .arg("hash")
            .arg(tmp.path().join("missing"))
            .output()
            .unwrap(),
    );
    assert!(err.contains("missing"), "{err}");
}
