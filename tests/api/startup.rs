//! Start-up as an operator meets it: configuration from `catraca.toml`, `.env` and the environment, and
//! start-up errors that name the file at fault.

use std::path::Path;

use crate::binary::{Cli, printed};
use crate::helpers::{copy_dir, repo};

/// `catraca` for a fresh folder: its own database, audit folder and copies of the example policy and
/// executors (so a test may break them), on a free port, without dev conveniences.
fn gateway_in(dir: &Path) -> Cli {
    copy_dir(&repo("policies"), &dir.join("policies"));
    copy_dir(&repo("executors"), &dir.join("executors"));
    Cli::new()
        .cwd(dir)
        .env(
            "CATRACA_DATABASE_URL",
            format!("sqlite://{}", dir.join("catraca.db").display()),
        )
        .env(
            "CATRACA_POLICIES_DIR",
            dir.join("policies").display().to_string(),
        )
        .env(
            "CATRACA_EXECUTORS_DIR",
            dir.join("executors").display().to_string(),
        )
        .env("CATRACA_AUDIT_DIR", dir.join("audit").display().to_string())
        .env("CATRACA_LISTEN", "127.0.0.1:0")
        .env("CATRACA_MODE", "staging")
}

/// Runs `args`, which must fail, and returns everything it printed.
fn failure(cli: &Cli, args: &[&str]) -> String {
    let out = cli.output(args);
    assert!(
        !out.status.success(),
        "catraca {args:?} should have failed: {}",
        printed(&out)
    );
    printed(&out)
}

#[test]
fn a_broken_policy_file_stops_serve_and_policy_check_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cli = gateway_in(dir.path());
    std::fs::write(
        dir.path().join("policies").join("zz-broken.toml"),
        "[[rules]]\nid = \"x\"\neffect = \"maybe\"\nroles = [\"*\"]\ncontexts = [\"*\"]\nactions = [\"*\"]\n",
    )
    .unwrap();

    for command in [&["serve"][..], &["policy", "check"]] {
        let text = failure(&cli, command);
        assert!(text.contains("zz-broken.toml"), "{command:?}: {text}");
    }
}

#[test]
fn a_broken_executor_file_stops_serve_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cli = gateway_in(dir.path());
    let executors = dir.path().join("executors");
    for (file, text) in [
        (
            "zz-unknown-setting.toml",
            "name = \"odd\"\nkind = \"echo\"\n[settings]\nmax_delay_msec = 10\n",
        ),
        (
            "zz-unknown-kind.toml",
            "name = \"odd\"\nkind = \"teleporter\"\n",
        ),
    ] {
        std::fs::write(executors.join(file), text).unwrap();

        let printed = failure(&cli, &["serve"]);

        assert!(printed.contains(file), "{file}: {printed}");
        std::fs::remove_file(executors.join(file)).unwrap();
    }
}

#[test]
fn a_bad_catraca_toml_stops_serve_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cli = gateway_in(dir.path());
    std::fs::write(
        dir.path().join("catraca.toml"),
        "mode = \"staging\"\naudit_queue_capacty = 10\n",
    )
    .unwrap();

    let text = failure(&cli, &["serve"]);

    assert!(text.contains("catraca.toml"), "{text}");
    assert!(text.contains("audit_queue_capacty"), "{text}");

    let elsewhere = dir.path().join("elsewhere.toml");
    std::fs::write(&elsewhere, "listen = \"not an address\"\n").unwrap();
    let text = failure(&cli, &["--config", elsewhere.to_str().unwrap(), "serve"]);
    assert!(text.contains("elsewhere.toml"), "{text}");
}

#[test]
fn the_process_environment_beats_the_dot_env_file() {
    let dir = tempfile::tempdir().unwrap();
    let from_env = dir.path().join("from-env.db");
    let from_dotenv = dir.path().join("from-dotenv.db");
    std::fs::write(
        dir.path().join(".env"),
        format!("CATRACA_DATABASE_URL=sqlite://{}\n", from_dotenv.display()),
    )
    .unwrap();
    let cli = Cli::new().cwd(dir.path());

    cli.clone()
        .env(
            "CATRACA_DATABASE_URL",
            format!("sqlite://{}", from_env.display()),
        )
        .run(&["migrate"]);

    assert!(from_env.exists(), "the environment's database was used");
    assert!(
        !from_dotenv.exists(),
        ".env did not override the environment"
    );

    // Without the variable in the environment, .env supplies it.
    cli.without("CATRACA_DATABASE_URL").run(&["migrate"]);
    assert!(
        from_dotenv.exists(),
        ".env is read when the environment is silent"
    );
}
