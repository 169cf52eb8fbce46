//! Engine tests with a real subprocess as the job body.

use super::*;
use kiln_exec::Cmd;

struct Sleeper;

#[async_trait::async_trait]
impl JobKind for Sleeper {
    fn kind(&self) -> &'static str {
        "sleep"
    }
    async fn run(
        &self,
        ctx: &JobContext,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, JobError> {
        let secs = params["secs"].as_f64().unwrap_or(0.0);
        if params["fail"].as_bool() == Some(true) {
            return Err(JobError::Failed("asked to fail".into()));
        }
        ctx.progress("sleeping", 50);
        Cmd::new("sleep")
            .arg(secs.to_string())
            .run(ctx.log.clone(), &ctx.cancel)
            .await?;
        Ok(serde_json::json!({"slept": secs}))
    }
}

fn engine(dir: &std::path::Path, timeout: Duration) -> Arc<Engine> {
    let db = Arc::new(Db::open(&dir.join("db")).unwrap());
    Engine::new(
        db,
        EngineConfig {
            concurrency: 2,
            job_timeout: timeout,
            lease: Duration::from_secs(30),
            work_dir: dir.join("work"),
            log_dir: dir.join("logs"),
            keep_workdir: false,
            max_attempts: 3,
        },
        vec![Arc::new(Sleeper)],
        Arc::new(Metrics::new()),
    )
    .unwrap()
}

async fn wait_terminal(e: &Engine, id: &JobId) -> JobRow {
    for _ in 0..200 {
        let j = e.get(id).unwrap().unwrap();
        if j.status.is_terminal() {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} never finished");
}

fn created(s: Submitted) -> JobRow {
    match s {
        Submitted::Created(j) => j,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn runs_fails_times_out_and_cancels() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), Duration::from_secs(2));
    let _workers = e.start(CancellationToken::new()).unwrap();

    let ok = created(
        e.submit("sleep", "a", &serde_json::json!({"secs": 0.1}), None, false)
            .unwrap(),
    );
    let j = wait_terminal(&e, &ok.id).await;
    assert_eq!(j.status, JobStatus::Completed);
    assert_eq!(j.result.unwrap()["slept"], 0.1);
    assert!(std::fs::read_to_string(e.log_path(&ok.id))
        .unwrap()
        .contains("stage: sleeping"));

    let bad = created(
        e.submit(
            "sleep",
            "b",
            &serde_json::json!({"fail": true}),
            None,
            false,
        )
        .unwrap(),
    );
    let j = wait_terminal(&e, &bad.id).await;
    assert_eq!(
        (j.status, j.error.as_deref()),
        (JobStatus::Failed, Some("asked to fail"))
    );

    let slow = created(
        e.submit("sleep", "c", &serde_json::json!({"secs": 60}), None, false)
            .unwrap(),
    );
    let j = wait_terminal(&e, &slow.id).await;
    assert_eq!(j.status, JobStatus::Failed);
    assert!(j.error.unwrap().contains("timed out"));

    let long = created(
        e.submit("sleep", "d", &serde_json::json!({"secs": 1.5}), None, false)
            .unwrap(),
    );
    for _ in 0..100 {
        if e.get(&long.id).unwrap().unwrap().status == JobStatus::Building {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let j = e.cancel(&long.id).await.unwrap();
    assert_eq!(j.status, JobStatus::Cancelled);
    assert!(e
        .metrics()
        .render()
        .contains("kiln_jobs_total{kind=\"sleep\",status=\"cancelled\"} 1"));
}

#[tokio::test]
async fn follow_streams_until_the_job_ends() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), Duration::from_secs(10));
    let _workers = e.start(CancellationToken::new()).unwrap();
    let j = created(
        e.submit("sleep", "f", &serde_json::json!({"secs": 0.6}), None, false)
            .unwrap(),
    );
    let e2 = e.clone();
    let id = j.id.clone();
    let done: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(move || {
        e2.get(&id)
            .ok()
            .flatten()
            .is_some_and(|j| j.status.is_terminal())
    });
    let chunks: Vec<_> = follow_log(e.log_path(&j.id), done).collect().await;
    let text: String = chunks
        .into_iter()
        .map(|c| String::from_utf8(c.unwrap()).unwrap())
        .collect();
    assert!(text.contains("started"), "{text}");
    assert!(text.contains("job completed"), "{text}");
}

/// A kind with one slot of its own: its jobs run one at a time, while the
/// shared slots keep serving the other kind.
struct Serial;

#[async_trait::async_trait]
impl JobKind for Serial {
    fn kind(&self) -> &'static str {
        "serial"
    }
    fn concurrency(&self) -> Option<usize> {
        Some(1)
    }
    async fn run(
        &self,
        ctx: &JobContext,
        _: serde_json::Value,
    ) -> Result<serde_json::Value, JobError> {
        Cmd::new("sleep")
            .arg("0.4")
            .run(ctx.log.clone(), &ctx.cancel)
            .await?;
        Ok(serde_json::json!({}))
    }
}

#[tokio::test]
async fn a_kind_with_its_own_slots_runs_within_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Db::open(&dir.path().join("db")).unwrap());
    let e = Engine::new(
        db,
        EngineConfig {
            concurrency: 1,
            job_timeout: Duration::from_secs(10),
            lease: Duration::from_secs(30),
            work_dir: dir.path().join("work"),
            log_dir: dir.path().join("logs"),
            keep_workdir: false,
            max_attempts: 3,
        },
        vec![Arc::new(Sleeper), Arc::new(Serial)],
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let _workers = e.start(CancellationToken::new()).unwrap();
    let serial: Vec<JobRow> = (0..3)
        .map(|i| {
            created(
                e.submit(
                    "serial",
                    &format!("s{i}"),
                    &serde_json::json!({}),
                    None,
                    false,
                )
                .unwrap(),
            )
        })
        .collect();
    let sleeper = created(
        e.submit("sleep", "x", &serde_json::json!({"secs": 0.1}), None, false)
            .unwrap(),
    );
    // The other kind is not held up behind the serial queue.
    let j = wait_terminal(&e, &sleeper.id).await;
    assert_eq!(j.status, JobStatus::Completed);
    let mut spans = vec![];
    for s in &serial {
        let j = wait_terminal(&e, &s.id).await;
        assert_eq!(j.status, JobStatus::Completed);
        spans.push((j.started_at.unwrap(), j.finished_at.unwrap()));
    }
    assert!(j.finished_at.unwrap() < spans.iter().map(|s| s.1).max().unwrap());
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "serial jobs overlapped: {spans:?}");
    }
}
