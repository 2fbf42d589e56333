//! The command line: bad configuration is refused with the key named and a non-zero exit.

use crate::support::run_cli;

#[test]
fn bad_config_files_are_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[partitions]\nserverz = 2\n", "serverz"),
        ("[partitions]\nservers = \"two\"\n", "servers"),
        ("[partitions]\nservers = 0\n", "partitions.servers"),
        ("[partitions]\ncontainers = 0\n", "partitions.containers"),
        ("[rule]\nfuel = -1\n", "fuel"),
        ("[store]\ndurability = \"maybe\"\n", "durability"),
        ("[nonsense]\n", "nonsense"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let (ok, _, stderr) = run_cli(&[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--config",
            path.to_str().unwrap(),
        ]);
        assert!(!ok, "{text:?} was accepted");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains(key), "{text:?}: {stderr}");
    }
    let (ok, _, stderr) = run_cli(&["run", "--config", "/no/such/file.toml"]);
    assert!(!ok);
    assert!(stderr.contains("/no/such/file.toml"), "{stderr}");
}
