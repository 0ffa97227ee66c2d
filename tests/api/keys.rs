//! Key rotation: the new key inherits the old one's name, role, contexts and tier, the old one is
//! revoked in the same transaction, and both changes are in the trail.

use catraca::keys::{self, KeyError};
use serde_json::{Value, json};
use sqlx::Connection;

use crate::binary::Cli;
use crate::helpers::{KeySpec, key_id, reasons, spawn_app};

fn echo_in(context: &str) -> Value {
    json!({"action": "echo", "context_id": context, "payload": {"message": "x"}})
}

#[tokio::test]
async fn rotating_from_the_cli_copies_name_role_contexts_and_tier_revokes_the_old_key_and_audits_both()
 {
    let app = spawn_app().await;
    let cli = Cli::for_app(&app);
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
        "--json",
    ]))
    .unwrap();
    let old_key = created["key"].as_str().unwrap().to_owned();
    let old_id = created["key_id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.process(Some(&old_key), &echo_in("work")).await.status(),
        200
    );

    let rotated: Value =
        serde_json::from_str(&cli.stdout(&["keys", "rotate", &old_id, "--json"])).unwrap();

    let new_key = rotated["key"].as_str().unwrap().to_owned();
    let new_id = rotated["key_id"].as_str().unwrap().to_owned();
    assert_ne!(new_id, old_id);
    assert!(new_key.starts_with(&format!("ck_{new_id}_")), "{rotated}");
    assert_eq!(rotated["rotated_from"], old_id.as_str());
    let listed: Value = serde_json::from_str(&cli.stdout(&["keys", "list", "--json"])).unwrap();
    let stored = |id: &str| -> Value {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["key_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} is not listed: {listed}"))
    };
    let (old, new) = (stored(&old_id), stored(&new_id));
    for field in ["name", "role", "contexts", "tier"] {
        assert_eq!(rotated[field], created[field], "printed {field}");
        assert_eq!(new[field], created[field], "stored {field}");
    }
    assert!(old["revoked_at"].is_string(), "{old}");
    assert!(new["revoked_at"].is_null(), "{new}");

    // The rotation (another process) reaches the gateway within its bound.
    tokio::time::sleep(app.app.auth.keys().bound()).await;
    let (status, body) = reasons(app.process(Some(&old_key), &echo_in("work")).await).await;
    assert_eq!(
        (status, &body["reason_codes"]),
        (401, &json!(["AUTH_KEY_REVOKED"]))
    );
    assert_eq!(
        app.process(Some(&new_key), &echo_in("work")).await.status(),
        200
    );
    let (status, body) = reasons(app.process(Some(&new_key), &echo_in("partner")).await).await;
    assert_eq!(
        (status, &body["reason_codes"]),
        (403, &json!(["CONTEXT_FORBIDDEN"])),
        "the new key keeps the old key's contexts"
    );

    let trail: Vec<Value> = cli
        .stdout(&["audit", "export", "--since", "2000-01-01"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        trail
            .iter()
            .any(|e| e["event_type"] == "KEY_REVOKED" && e["key_id"] == old_id.as_str()),
        "KEY_REVOKED names the old key"
    );
    let new_created = trail
        .iter()
        .find(|e| e["event_type"] == "KEY_CREATED" && e["key_id"] == new_id.as_str())
        .expect("KEY_CREATED names the new key");
    assert_eq!(new_created["rotated_from"], old_id.as_str());
}

#[tokio::test]
async fn a_rotation_whose_new_key_cannot_be_stored_leaves_the_old_key_usable() {
    let app = spawn_app().await;
    let key = app
        .key(KeySpec {
            role: "analyst",
            ..KeySpec::default()
        })
        .await;
    let key_id = key_id(&key);
    let keys_before = app.app.store.list_keys().await.unwrap().len();
    // The store refuses the new key's row, as a full disk would, after the old key's UPDATE ran.
    let mut conn = sqlx::SqliteConnection::connect(&app.db_url())
        .await
        .unwrap();
    sqlx::query(
        "CREATE TRIGGER test_no_new_keys BEFORE INSERT ON api_keys \
         BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    let rotated = keys::rotate(
        app.app.store.as_ref(),
        &app.app.audit,
        &app.app.policy(),
        &key_id,
        None,
        "test",
    )
    .await;

    assert!(matches!(rotated, Err(KeyError::Store(_))), "{rotated:?}");
    let old = app.app.store.get_key(&key_id).await.unwrap().unwrap();
    assert_eq!(old.revoked_at, None, "the old key is not revoked");
    assert_eq!(app.app.store.list_keys().await.unwrap().len(), keys_before);
    assert_eq!(
        app.process(Some(&key), &echo_in("work")).await.status(),
        200
    );
}
