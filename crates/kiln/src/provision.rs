//! `kiln provision`: submit a volume provisioning job, show its progress
//! (stage, percent, bytes) until it ends, and exit non-zero unless it
//! completed. Ctrl-C cancels the job on the server before exiting.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::{server_error, Api};
use crate::config::ProvisionArgs;

pub async fn run(a: ProvisionArgs) -> Result<()> {
    let api = Api::new(&a.client)?;
    let body = serde_json::json!({
        "image_url": a.image_url,
        "volume_name": a.volume_name,
        "volume_size_gb": a.size_gb,
        "image_type": a.image_type,
        "correlation_id": a.correlation_id,
    });
    let bytes = serde_json::to_vec(&body)?;
    let digest = kiln_auth::body_sha256_hex(&bytes);
    let resp = api
        .request(
            reqwest::Method::POST,
            "/api/v1/provision",
            &[],
            Some(digest),
        )?
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(bytes)
        .send()
        .await
        .with_context(|| format!("connecting to {}", api.server()))?;
    if !resp.status().is_success() {
        return Err(server_error(resp).await);
    }
    let v: serde_json::Value = resp.json().await?;
    let id = v["job_id"]
        .as_str()
        .context("the server's answer has no job_id")?
        .to_string();
    if a.no_wait {
        println!("{id}");
        return Ok(());
    }
    eprintln!(
        "job {id}: provisioning {} onto {}",
        a.image_url, a.volume_name
    );
    let pb = ProgressBar::new(100).with_style(
        ProgressStyle::with_template("{msg:>12} {bar:30} {pos:>3}% {prefix}").expect("template"),
    );
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let last = loop {
        let resp = api
            .get(&format!("/api/v1/status/{id}"), &[])?
            .send()
            .await
            .with_context(|| format!("asking {} for job {id}", api.server()))?;
        if !matches!(resp.status().as_u16(), 200 | 202) {
            return Err(server_error(resp).await);
        }
        let j: serde_json::Value = resp.json().await?;
        let p = &j["progress"];
        pb.set_message(p["stage"].as_str().unwrap_or("pending").to_string());
        pb.set_position(p["percent"].as_u64().unwrap_or(0));
        if let (Some(done), Some(total)) =
            (p["bytes_processed"].as_u64(), p["bytes_total"].as_u64())
        {
            if total > 0 {
                pb.set_prefix(format!(
                    "{} / {}",
                    indicatif::HumanBytes(done),
                    indicatif::HumanBytes(total)
                ));
            }
        }
        if matches!(
            j["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            break j;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = &mut ctrl_c => {
                pb.abandon_with_message("cancelling");
                let r = api
                    .request(reqwest::Method::DELETE, &format!("/api/v1/cancel/{id}"), &[], None)?
                    .send()
                    .await?;
                if !r.status().is_success() {
                    return Err(server_error(r).await);
                }
                bail!("job {id} cancelled");
            }
        }
    };
    pb.finish_and_clear();
    match last["status"].as_str() {
        Some("completed") => {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "job_id": id,
                    "status": "completed",
                    "cache_hit": last["cache_hit"],
                    "image_path": last["image_path"],
                    "volume_path": last["result"]["volume_path"],
                    "correlation_id": last["correlation_id"],
                }))?
            );
            Ok(())
        }
        s => bail!(
            "job {id} {}: {} (log: kiln logs {id})",
            s.unwrap_or("ended"),
            last["error"].as_str().unwrap_or("no reason given")
        ),
    }
}
