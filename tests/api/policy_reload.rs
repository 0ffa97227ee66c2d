//! The policy outside dev mode: edited files are read only when an operator asks, with
//! `catraca policy reload` (every gateway on the database) or SIGHUP (one process). Each reload shows on
//! `/ready` and in the trail (POLICY_LOADED with its trigger).

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::binary::{Cli, Serve, printed};
use crate::helpers::{copy_dir, repo};

/// The policy revision a gateway reports on `/ready`.
async fn ready_revision(serve: &Serve) -> String {
    let ready: Value = reqwest::get(serve.url("/ready"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    ready["policy_revision"].as_str().unwrap().to_owned()
}

/// The revision `catraca policy check` computes from the files as they are now.
fn files_revision(cli: &Cli) -> String {
    let out = cli.stdout(&["policy", "check"]);
    out.split_whitespace()
        .skip_while(|w| *w != "revision")
        .nth(1)
        .unwrap_or_else(|| panic!("no revision in: {out}"))
        .to_owned()
}

/// Waits until the gateway reports `revision` on `/ready`.
async fn wait_for_revision(serve: &Serve, revision: &str, after: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if ready_revision(serve).await == revision {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never reported revision {revision} after {after}:\n{}",
            serve.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Adds an action to the policy (a new file), which changes its revision.
fn add_action(policies: &std::path::Path, name: &str) {
    std::fs::write(
        policies.join(format!("zz-{name}.toml")),
        format!(
            "[actions.\"{name}\"]\nexecutor = \"echo\"\ninput_schema = \"schemas/echo.json\"\n"
        ),
    )
    .unwrap();
}

/// A staging gateway serving its own copy of the example policy (in `dir/policies`), and the CLI on
/// its database and policy.
fn staging_gateway(dir: &std::path::Path) -> (Cli, std::path::PathBuf, Serve) {
    let policies = dir.join("policies");
    copy_dir(&repo("policies"), &policies);
    let db = format!("sqlite://{}", dir.join("catraca.db").display());
    let cli = Cli::on(&db, dir, "reload")
        .env("CATRACA_MODE", "staging")
        .env("CATRACA_LOG", "info")
        .env("CATRACA_POLICIES_DIR", policies.display().to_string());
    let serve = Serve::start(&cli);
    (cli, policies, serve)
}

#[tokio::test]
async fn a_staging_gateway_reads_edited_policy_files_only_when_asked_by_command_or_signal() {
    // Arrange: a staging gateway on its own copy of the example policy.
    let dir = tempfile::tempdir().unwrap();
    let (cli, policies, serve) = staging_gateway(dir.path());
    let started = ready_revision(&serve).await;
    assert_eq!(started, files_revision(&cli));

    // Act 1: the files change, nobody asks. Dev mode would have read them within 2 s.
    add_action(&policies, "echo.unasked");
    let edited = files_revision(&cli);
    assert_ne!(edited, started);
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // Assert 1: still the policy it started with.
    assert_eq!(ready_revision(&serve).await, started);

    // Act 2: an operator asks every gateway on the database.
    let asked = cli.output(&["policy", "reload"]);
    assert!(asked.status.success(), "{}", printed(&asked));
    assert!(printed(&asked).contains(&edited), "{}", printed(&asked));

    // Assert 2: the gateway reads its files and reports the new revision.
    wait_for_revision(&serve, &edited, "catraca policy reload").await;

    // Act 3: another edit, then SIGHUP to this one process.
    add_action(&policies, "echo.signalled");
    let signalled = files_revision(&cli);
    serve.signal("HUP");

    // Assert 3: read again; the process keeps serving (SIGHUP does not stop it).
    wait_for_revision(&serve, &signalled, "SIGHUP").await;
    serve.stop();
    let trail = cli.stdout(&["audit", "export", "--since", "2000-01-01"]);
    let loaded: Vec<(String, String)> = trail
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["event_type"] == "POLICY_LOADED")
        .map(|e| {
            (
                e["trigger"].as_str().unwrap().to_owned(),
                e["policy_revision"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        loaded,
        [
            ("start".to_owned(), started),
            ("request".to_owned(), edited),
            ("signal".to_owned(), signalled),
        ]
    );
}

#[tokio::test]
async fn a_reload_of_files_that_do_not_load_is_refused_and_the_policy_in_force_keeps_serving() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let (cli, policies, serve) = staging_gateway(dir.path());
    let started = ready_revision(&serve).await;

    // Act: a broken file; the command refuses to ask, a signal asks anyway.
    std::fs::write(policies.join("zz-broken.toml"), "[[rules]]\nid = 3\n").unwrap();
    let asked = cli.output(&["policy", "reload"]);
    serve.signal("HUP");
    serve.wait_for_stderr("the rejected reload", |e| {
        e.contains("policy reload rejected")
    });

    // Assert: the command failed before asking; the gateway still serves the policy it had and
    // recorded the rejection.
    assert!(!asked.status.success(), "{}", printed(&asked));
    assert_eq!(ready_revision(&serve).await, started);
    serve.stop();
    let trail = cli.stdout(&["audit", "export", "--since", "2000-01-01"]);
    let rejected: Vec<Value> = trail
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["event_type"] == "POLICY_REJECTED")
        .collect();
    assert_eq!(rejected.len(), 1, "{trail}");
    assert_eq!(rejected[0]["trigger"], "signal");
    assert_eq!(rejected[0]["serving_revision"], started.as_str());
}
