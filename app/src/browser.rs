//! Browser-only helpers (compiled with the `hydrate` feature): the job progress stream and
//! reading an uploaded file. On the server these are never called.

#[cfg(feature = "hydrate")]
mod imp {
    use wasm_bindgen::closure::Closure;
    use wasm_bindgen::JsCast;
    use web_sys::{EventSource, FileReader, HtmlInputElement, MessageEvent};

    use crate::dto::JobStatus;

    /// An open progress stream; closes when dropped.
    pub struct JobStream {
        source: EventSource,
        _on_message: Closure<dyn FnMut(MessageEvent)>,
        _on_error: Closure<dyn FnMut(web_sys::Event)>,
    }

    impl Drop for JobStream {
        fn drop(&mut self) {
            self.source.close();
        }
    }

    /// Follows `/api/jobs/{id}/events`, calling `on_status` for every update and `on_lost`
    /// if the connection drops for good.
    pub fn watch_job(
        job_id: &str,
        on_status: impl Fn(JobStatus) + 'static,
        on_lost: impl Fn() + 'static,
    ) -> Option<JobStream> {
        let source = EventSource::new(&format!("/api/jobs/{job_id}/events")).ok()?;
        let src = source.clone();
        let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |ev: MessageEvent| {
            let Some(text) = ev.data().as_string() else { return };
            if let Ok(status) = serde_json::from_str::<JobStatus>(&text) {
                if status.state.is_finished() {
                    // Closing first stops the browser from reconnecting when the server ends the stream.
                    src.close();
                }
                on_status(status);
            }
        });
        let src = source.clone();
        let on_error = Closure::<dyn FnMut(web_sys::Event)>::new(move |_| {
            // EventSource retries by itself; CLOSED means it gave up.
            if src.ready_state() == EventSource::CLOSED {
                on_lost();
            }
        });
        source.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        source.set_onerror(Some(on_error.as_ref().unchecked_ref()));
        Some(JobStream { source, _on_message: on_message, _on_error: on_error })
    }

    /// Reads the first file chosen in `input` as a `data:` URL, then calls `done(name, url)`.
    pub fn read_file_as_data_url(input: &HtmlInputElement, done: impl Fn(String, String) + 'static) {
        let Some(file) = input.files().and_then(|f| f.get(0)) else { return };
        let Ok(reader) = FileReader::new() else { return };
        let name = file.name();
        let r = reader.clone();
        let on_load = Closure::once(move |_: web_sys::ProgressEvent| {
            if let Some(url) = r.result().ok().and_then(|v| v.as_string()) {
                done(name, url);
            }
        });
        reader.set_onload(Some(on_load.as_ref().unchecked_ref()));
        // The closure must outlive this call; it runs once, so leaking it is bounded.
        on_load.forget();
        let _ = reader.read_as_data_url(&file);
    }
}

#[cfg(feature = "hydrate")]
pub use imp::*;
