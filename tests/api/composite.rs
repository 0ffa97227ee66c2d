//! Composites: steps re-authorized for the caller, audited as STEP_EXECUTED, partial results named.

use serde_json::{Value, json};

use crate::collector::{Reply, envelope, fixture, records};
use crate::helpers::{CHAIN_COMPOSITE, KeySpec, event_types, spawn_app_with};

/// A composite whose only step runs the composite itself.
const LOOP_COMPOSITE: &str = r#"
name = "loop"
kind = "composite"
timeout_ms = 10000
[settings]
mode = "fail_fast"
[[settings.steps]]
name = "again"
action = "test.loop"
"#;

/// A gateway whose `pncp` collector reads `fx` and whose `summarizer` echoes (no model server needed
/// to test the composite's wiring; the llm kind has its own tests).
async fn digest_gateway(fx: &crate::collector::Fixture) -> crate::helpers::TestApp {
    let url = format!("http://{}/api/consulta", fx.addr);
    spawn_app_with(move |c| {
        std::fs::write(
            c.executors_dir.join("pncp.toml"),
            format!(
                "name = \"pncp\"\nkind = \"collector\"\ntimeout_ms = 10000\n[settings]\nsource = \"pncp\"\n\
                 base_url = \"{url}\"\nmin_interval_ms = 0\nmax_retries = 0\ncache_ttl_secs = 0\n"
            ),
        )
        .unwrap();
        std::fs::write(
            c.executors_dir.join("summarizer.toml"),
            "name = \"summarizer\"\nkind = \"echo\"\ntimeout_ms = 1000\n",
        )
        .unwrap();
    })
    .await
}

fn digest(max: u64) -> Value {
    json!({"action": "licitacoes.digest", "context_id": "work", "payload": {
        "data_inicial": "2026-09-17", "data_final": "2026-09-17", "modalidade": 8, "uf": "SP",
        "max_summaries": max}})
}

/// A digest over four new records, summaries bounded to three, every step audited.
async fn digest_story(recs: Vec<Value>) {
    let served = recs.clone();
    let fx = fixture(move |_| Reply::json(envelope(&served[..4], 1, 1))).await;
    let app = digest_gateway(&fx).await;
    let operator = app.role_key("operator").await;

    let resp = app.process(Some(&operator), &digest(3)).await;

    assert_eq!(resp.status(), 200);
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    let r = &body["result"];
    assert_eq!(r["complete"], true, "{r}");
    assert_eq!(r["outputs"]["collect"]["new"].as_array().unwrap().len(), 4);
    let summaries = r["outputs"]["summaries"].as_array().unwrap();
    assert_eq!(summaries.len(), 3, "bounded by max_summaries");
    assert_eq!(summaries[0]["text"], recs[0]["objetoCompra"]);
    assert_eq!(
        summaries[0]["title"],
        recs[0]["orgaoEntidade"]["razaoSocial"]
    );
    assert_eq!(
        summaries[0]["numero_controle_pncp"],
        recs[0]["numeroControlePNCP"]
    );

    let events = app.events(&trace).await;
    let types = event_types(&events);
    assert_eq!(
        types,
        [
            "REQUEST_START",
            "DECISION",
            "EXECUTOR_SELECTED",
            "STEP_EXECUTED",
            "STEP_EXECUTED",
            "STEP_EXECUTED",
            "STEP_EXECUTED",
            "ACTION_EXECUTED",
            "REQUEST_END"
        ]
    );
    let steps: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["event_type"] == "STEP_EXECUTED")
        .map(|e| (e["action"].as_str().unwrap(), e["status"].as_str().unwrap()))
        .collect();
    assert_eq!(steps[0], ("licitacoes.collect", "success"));
    assert!(
        steps[1..]
            .iter()
            .all(|s| *s == ("licitacoes.summarize", "success"))
    );
    let first = events
        .iter()
        .find(|e| e["event_type"] == "STEP_EXECUTED")
        .unwrap();
    assert_eq!(first["determining_rules"], json!(["operators-collect"]));
    let stored = app.app.store.events_for_trace(&trace).await.unwrap();
    let timeline = catraca::audit::timeline::render(&trace, &stored);
    assert!(
        timeline.contains("step 1 licitacoes.collect (pncp) success"),
        "{timeline}"
    );
    assert!(
        timeline.contains("step 4 licitacoes.summarize (summarizer) success"),
        "{timeline}"
    );
}

#[tokio::test]
async fn a_digest_collects_then_summarises_each_new_record_and_audits_every_step() {
    digest_story(records()).await;
}

#[tokio::test]
async fn a_step_the_caller_may_not_run_is_refused_and_named() {
    let recs = records();
    let fx = fixture(move |_| Reply::json(envelope(&recs[..2], 1, 1))).await;
    let app = digest_gateway(&fx).await;
    let digester = app
        .key(KeySpec {
            role: "digester",
            ..KeySpec::default()
        })
        .await;

    let resp = app.process(Some(&digester), &digest(5)).await;

    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let r = &body["result"];
    assert_eq!(r["complete"], false);
    assert_eq!(r["failed_steps"], json!(["summaries"]));
    assert_eq!(
        r["outputs"]["collect"]["items"], 2,
        "the collection is kept"
    );
    let refused: Vec<&Value> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "refused")
        .collect();
    assert_eq!(refused.len(), 2);
    assert!(
        refused[0]["error"]
            .as_str()
            .unwrap()
            .contains("NO_MATCHING_RULE"),
        "{}",
        refused[0]
    );
}

#[tokio::test]
async fn continue_mode_runs_past_a_failed_step_and_fail_fast_stops() {
    let app = spawn_app_with(|_| {}).await;
    let key = app.admin_key().await;
    let chain =
        json!({"action": "test.chain", "context_id": "work", "payload": {"message": "depois"}});
    let body: Value = app.process(Some(&key), &chain).await.json().await.unwrap();
    let r = &body["result"];
    assert_eq!(r["failed_steps"], json!(["first"]));
    assert_eq!(r["outputs"]["second"], json!({"message": "depois"}));

    let app = spawn_app_with(|c| {
        std::fs::write(
            c.executors_dir.join("chain.toml"),
            CHAIN_COMPOSITE.replace("mode = \"continue\"", "mode = \"fail_fast\""),
        )
        .unwrap();
    })
    .await;
    let key = app.admin_key().await;
    let resp = app.process(Some(&key), &chain).await;
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    let r = &body["result"];
    assert_eq!(r["failed_steps"], json!(["first"]));
    assert_eq!(
        r["steps"].as_array().unwrap().len(),
        1,
        "nothing ran after the failure"
    );
    let steps = app
        .events(&trace)
        .await
        .into_iter()
        .filter(|e| e["event_type"] == "STEP_EXECUTED")
        .count();
    assert_eq!(steps, 1);
}

#[tokio::test]
async fn a_composite_that_calls_itself_is_stopped_with_step_depth_exceeded_and_audited() {
    let app = spawn_app_with(|c| {
        std::fs::write(c.executors_dir.join("loop.toml"), LOOP_COMPOSITE).unwrap();
        std::fs::write(
            c.policies_dir.join("zz-loop.toml"),
            "[actions.\"test.loop\"]\nexecutor = \"loop\"\n",
        )
        .unwrap();
    })
    .await;
    let key = app.admin_key().await;
    let call = json!({"action": "test.loop", "context_id": "work", "payload": {}});

    let resp = app.process(Some(&key), &call).await;

    assert_eq!(resp.status(), 200);
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    // The innermost composite reports its step refused; each one around it returns that report.
    let mut level = &body["result"];
    while level["failed_steps"] != json!(["again"]) {
        assert_eq!(level["steps"][0]["status"], "success", "{body}");
        level = &level["outputs"]["again"];
        assert!(level.is_object(), "no level names the refusal: {body}");
    }
    assert_eq!(level["steps"][0]["status"], "refused");
    let error = level["steps"][0]["error"].as_str().unwrap();
    assert!(error.contains("STEP_DEPTH_EXCEEDED"), "{error}");

    let steps: Vec<Value> = app
        .events(&trace)
        .await
        .into_iter()
        .filter(|e| e["event_type"] == "STEP_EXECUTED")
        .collect();
    let refused: Vec<&Value> = steps.iter().filter(|e| e["status"] == "refused").collect();
    assert_eq!(refused.len(), 1, "{steps:?}");
    assert_eq!(refused[0]["reason_codes"], json!(["STEP_DEPTH_EXCEEDED"]));
    assert_eq!(refused[0]["action"], "test.loop");
    let deepest = steps.iter().filter_map(|e| e["depth"].as_u64()).max();
    assert_eq!(
        refused[0]["depth"].as_u64(),
        deepest,
        "the refusal is the deepest step"
    );
    let mut depths: Vec<u64> = steps.iter().filter_map(|e| e["depth"].as_u64()).collect();
    depths.sort_unstable();
    let expected: Vec<u64> = (1..=steps.len() as u64).collect();
    assert_eq!(depths, expected, "one step at each depth down to the bound");
}

/// The digest against real PNCP records recorded by third parties (`../shared/fixtures/pncp`).
mod recorded {
    use super::*;
    use crate::collector::recorded_records;

    #[tokio::test]
    #[cfg_attr(
        not(recorded_pncp),
        ignore = "needs the recorded PNCP responses in ../shared/fixtures/pncp"
    )]
    async fn a_digest_of_real_records_summarises_each_new_one_and_audits_every_step() {
        digest_story(recorded_records()).await;
    }
}
