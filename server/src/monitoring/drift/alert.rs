//! Drift alerts sent to a webhook in the payload shape Alertmanager POSTs to its webhook
//! receivers (Prometheus Alertmanager, `webhook_config`, payload `version: "4"`:
//! <https://prometheus.io/docs/alerting/latest/configuration/#webhook_config>), so whatever
//! already takes Alertmanager's notifications (chat bridges, incident tools) takes the
//! studio's too.

pub use app::dto::monitoring::Alert;
use serde_json::{json, Value};

/// The `alertname` label of every quality-drift alert.
pub const ALERT_NAME: &str = "AtelierQualityDrift";

/// RFC 3339 (UTC, milliseconds) of `ms` since the epoch.
fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// The webhook body for `alert` (`status` `firing` or `resolved`), as Alertmanager sends it.
/// `external_url` is the studio's address (the `generatorURL` links to its Deployments page).
pub fn webhook_payload(alert: &Alert, external_url: &str) -> Value {
    let status = if alert.is_firing() { "firing" } else { "resolved" };
    let labels = json!({
        "alertname": ALERT_NAME,
        "deployment": alert.deployment,
        "version": alert.version,
        "severity": "warning",
        "service": "atelier",
    });
    let description = alert.checks.iter().map(super::rule::MeasureCheck::describe).collect::<Vec<_>>().join("; ");
    let mut annotations = json!({
        "summary": alert.summary,
        "description": description,
    });
    if let Some(s) = &alert.suggestion {
        annotations["retraining_suggestion"] = Value::String(s.headline.clone());
    }
    let base = external_url.trim_end_matches('/');
    json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname=\"{ALERT_NAME}\", deployment=\"{}\"}}", alert.deployment),
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "atelier",
        "groupLabels": { "alertname": ALERT_NAME, "deployment": alert.deployment },
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": base,
        "alerts": [{
            "status": status,
            "labels": labels,
            "annotations": annotations,
            "startsAt": rfc3339(alert.starts_at),
            "endsAt": alert.ends_at.map_or_else(|| "0001-01-01T00:00:00Z".to_string(), rfc3339),
            "generatorURL": format!("{base}/deployments?name={}", alert.deployment),
            "fingerprint": alert.fingerprint,
        }],
    })
}

/// POSTs `payload` to `url` (blocking; 10 s timeout). Errors are returned for logging: a
/// webhook that is down never stops serving.
pub fn post(url: &str, payload: &Value) -> Result<(), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(std::time::Duration::from_secs(10))).build().into();
    agent.post(url).send_json(payload).map(|_| ()).map_err(|e| format!("posting the drift alert to {url}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_alertmanagers_fields() {
        let alert = Alert {
            fingerprint: "ink-1".into(),
            deployment: "ink".into(),
            version: "ink@2".into(),
            reference_version: "ink@1".into(),
            starts_at: 1_764_460_800_000,
            ends_at: None,
            summary: "style similarity fell".into(),
            checks: vec![],
            suggestion: None,
        };
        let p = webhook_payload(&alert, "http://studio:8080/");
        assert_eq!(p["version"], "4");
        assert_eq!(p["status"], "firing");
        assert_eq!(p["alerts"][0]["labels"]["alertname"], ALERT_NAME);
        assert_eq!(p["alerts"][0]["startsAt"], "2025-11-30T00:00:00.000Z");
        assert_eq!(p["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(p["alerts"][0]["generatorURL"], "http://studio:8080/deployments?name=ink");
        let resolved = Alert { ends_at: Some(1_764_460_860_000), ..alert };
        let p = webhook_payload(&resolved, "http://studio:8080");
        assert_eq!(p["status"], "resolved");
        assert_eq!(p["alerts"][0]["endsAt"], "2025-11-30T00:01:00.000Z");
    }
}
