//! The `catraca` binary as operators use it: keys (audited), policy, trace, export.

use std::process::{Command, Output};

use serde_json::Value;

use crate::helpers::{echo, spawn_app};

struct Cli {
    env: Vec<(&'static str, String)>,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_catraca"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "catraca {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn stdout(&self, args: &[&str]) -> String {
        String::from_utf8(self.run(args).stdout).unwrap()
    }
}

#[tokio::test]
async fn keys_are_audited_and_requests_can_be_traced_and_exported() {
    let app = spawn_app().await;
    let cli = Cli {
        env: vec![
            ("CATRACA_DATABASE_URL", app.db_url()),
            // The example policy and executors (the test app adds kinds only the harness knows).
            (
                "CATRACA_POLICIES_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/policies").into(),
            ),
            (
                "CATRACA_EXECUTORS_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/executors").into(),
            ),
            (
                "CATRACA_AUDIT_DIR",
                app.dir.path().join("cli-audit").display().to_string(),
            ),
            ("CATRACA_INSTANCE_ID", "cli-test".into()),
            ("CATRACA_LOG", "error".into()),
        ],
    };

    let created: Value = serde_json::from_str(&cli.stdout(&[
        "keys",
        "create",
        "--name",
        "ana",
        "--role",
        "analyst",
        "--context",
        "work",
        "--tier",
        "bulk",
        "--expires-in",
        "90d",
        "--json",
    ]))
    .unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let key_id = created["key_id"].as_str().unwrap().to_owned();
    assert!(key.starts_with(&format!("ck_{key_id}_")));
    assert_eq!(created["contexts"], serde_json::json!(["work"]));
    assert!(created["expires_at"].as_str().unwrap() > "2027");

    let resp = app.process(Some(&key), &echo("x")).await;
    assert_eq!(resp.status(), 200);
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();

    let timeline = cli.stdout(&["audit", "trace", &trace]);
    for needle in [
        "REQUEST_START",
        "ALLOW by action_matrix",
        "gate auth",
        "executor echo",
        "HTTP 200 SUCCESS",
    ] {
        assert!(
            timeline.contains(needle),
            "{needle} missing from:\n{timeline}"
        );
    }
    let as_json: Value =
        serde_json::from_str(&cli.stdout(&["audit", "trace", &trace, "--json"])).unwrap();
    assert_eq!(as_json["events"].as_array().unwrap().len(), 5);

    let listed = cli.stdout(&["keys", "list", "--json"]);
    assert!(
        listed.contains(&key_id) && !listed.contains(&key),
        "list shows ids, never keys"
    );
    cli.run(&["keys", "revoke", &key_id]);
    assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 401);

    let export = cli.stdout(&["audit", "export", "--since", "2000-01-01"]);
    let types: Vec<String> = export
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["event_type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(types.iter().any(|t| t == "KEY_CREATED"));
    assert!(types.iter().any(|t| t == "KEY_REVOKED"));
    assert!(types.iter().any(|t| t == "POLICY_LOADED"));
    let csv = cli.stdout(&[
        "audit",
        "export",
        "--since",
        "2000-01-01",
        "--format",
        "csv",
    ]);
    assert_eq!(
        csv.lines().count(),
        types.len() + 1,
        "one header, one row per event"
    );
    let none = cli.stdout(&[
        "audit",
        "export",
        "--since",
        "2000-01-01",
        "--until",
        "2000-01-02",
    ]);
    assert!(none.is_empty());

    assert!(cli.stdout(&["policy", "test"]).contains("0 failed"));
    assert!(
        cli.stdout(&["audit", "verify"])
            .starts_with("audit verify: intact")
    );
}
