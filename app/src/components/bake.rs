//! Baking the current blend into one LoRA file: a queued task on the server with live
//! progress (layers baked of all), cancel, then the download link.

use leptos::prelude::*;

use crate::dto::{BakeRequest, BakeState, BakeStatus};

/// Buttons that bake the blend behind share code `code` exactly or compressed to rank 8,
/// and the state of the last bake.
#[component]
pub fn BakeBlend(code: String) -> impl IntoView {
    let status: RwSignal<Option<BakeStatus>> = RwSignal::new(None);
    let error: RwSignal<Option<String>> = RwSignal::new(None);
    // The open progress stream (browser only); replaced by the next bake.
    #[cfg(feature = "hydrate")]
    let stream: StoredValue<Option<crate::browser::EventStream>, LocalStorage> = StoredValue::new_local(None);
    let start = move |rank: Option<usize>| {
        let request = BakeRequest { link: code.clone(), rank };
        error.set(None);
        #[cfg(feature = "hydrate")]
        leptos::task::spawn_local(async move {
            match crate::browser::post_json::<_, BakeStatus>("/api/blends/bakes", &request).await {
                Ok(s) => {
                    let url = format!("/api/blends/bakes/{}/events", s.id);
                    status.set(Some(s));
                    let on_lost = move || error.set(Some("lost the connection to the server".into()));
                    let watched = crate::browser::watch(&url, |s: &BakeStatus| s.state.is_finished(), move |s| status.set(Some(s)), on_lost);
                    stream.set_value(watched);
                }
                Err(e) => error.set(Some(e)),
            }
        });
        #[cfg(not(feature = "hydrate"))]
        let _ = request;
    };
    let cancel = move |_| {
        let Some(id) = status.with_untracked(|s| s.as_ref().map(|s| s.id.clone())) else { return };
        crate::browser::post_in_background(format!("/api/blends/bakes/{id}/cancel"), error);
    };
    let busy = move || status.with(|s| s.as_ref().is_some_and(|s| !s.state.is_finished()));
    let start_exact = start.clone();
    view! {
        <button type="button" class="bake" disabled=busy on:click=move |_| start_exact(None)>"Bake as one LoRA (exact)"</button>
        <button type="button" class="bake" disabled=busy on:click=move |_| start(Some(8))>"… compressed to rank 8"</button>
        {move || status.get().map(|s| {
            let line = match &s.state {
                BakeState::Queued { position } => format!("queued (position {position})"),
                BakeState::Running => format!("baking layer {} of {}", s.done, s.total),
                BakeState::Done { relative_error, bytes } => match s.request.rank {
                    Some(r) => format!("done: rank {r}, {:.1} % of the blend lost, {} KB", relative_error * 100.0, bytes / 1024),
                    None => format!("done: exact, {} KB", bytes / 1024),
                },
                BakeState::Failed { message } => format!("failed: {message}"),
                BakeState::Cancelled => "cancelled".into(),
            };
            let running = matches!(s.state, BakeState::Queued { .. } | BakeState::Running);
            let done = matches!(s.state, BakeState::Done { .. });
            let file = format!("/api/blends/bakes/{}/file", s.id);
            let name = match s.request.rank {
                Some(r) => format!("blend-r{r}.safetensors"),
                None => "blend.safetensors".to_string(),
            };
            view! {
                <span class="bake-state" aria-live="polite">
                    <progress max=s.total.max(1) value=s.done></progress>
                    " " {line}
                    {running.then(|| view! { " " <button type="button" on:click=cancel>"Cancel"</button> })}
                    {done.then(|| view! { " " <a class="download" href=file download=name>"Download"</a> })}
                </span>
            }
        })}
        {move || error.get().map(|e| view! { <span class="error">{e}</span> })}
    }
}
