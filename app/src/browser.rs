//! Browser-only helpers (compiled with the `hydrate` feature): progress streams (jobs and
//! style trainings), reading a chosen file, and uploading files with progress. On the server these are never called.

#[cfg(feature = "hydrate")]
mod imp {
    use wasm_bindgen::closure::Closure;
    use wasm_bindgen::JsCast;
    use serde::de::DeserializeOwned;
    use web_sys::{EventSource, FileReader, FormData, HtmlInputElement, MessageEvent, ProgressEvent, XmlHttpRequest};

    use crate::dto::{ErrorBody, JobStatus, TrainingStatus};

    /// An open progress stream; closes when dropped.
    pub struct EventStream {
        source: EventSource,
        _on_message: Closure<dyn FnMut(MessageEvent)>,
        _on_error: Closure<dyn FnMut(web_sys::Event)>,
    }

    /// The stream of a generation job.
    pub type JobStream = EventStream;

    impl Drop for EventStream {
        fn drop(&mut self) {
            self.source.close();
        }
    }

    /// Follows the SSE stream at `url` whose events are JSON `T`, calling `on_value` for
    /// each, closing after a value for which `last` holds, and calling `on_lost` if the
    /// connection drops for good.
    pub fn watch<T: DeserializeOwned + 'static>(
        url: &str,
        last: fn(&T) -> bool,
        on_value: impl Fn(T) + 'static,
        on_lost: impl Fn() + 'static,
    ) -> Option<EventStream> {
        let source = EventSource::new(url).ok()?;
        let src = source.clone();
        let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |ev: MessageEvent| {
            let Some(text) = ev.data().as_string() else { return };
            if let Ok(value) = serde_json::from_str::<T>(&text) {
                if last(&value) {
                    // Closing first stops the browser from reconnecting when the server ends the stream.
                    src.close();
                }
                on_value(value);
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
        Some(EventStream { source, _on_message: on_message, _on_error: on_error })
    }

    /// Follows `/api/jobs/{id}/events` until the job finishes.
    pub fn watch_job(job_id: &str, on_status: impl Fn(JobStatus) + 'static, on_lost: impl Fn() + 'static) -> Option<JobStream> {
        watch(&format!("/api/jobs/{job_id}/events"), |s: &JobStatus| s.state.is_finished(), on_status, on_lost)
    }

    /// Follows `/api/style-trainings/{id}/events` until the training stops, fails or ends.
    pub fn watch_training(id: &str, on_status: impl Fn(TrainingStatus) + 'static, on_lost: impl Fn() + 'static) -> Option<EventStream> {
        watch(&format!("/api/style-trainings/{id}/events"), |s: &TrainingStatus| !s.state.is_active(), on_status, on_lost)
    }

    /// Sends every file chosen in `input` to `url` as multipart form-data (fields named
    /// `files`), reporting (bytes sent, bytes in all) as the upload goes, then `done` with
    /// the JSON reply or the error message the server gave.
    pub fn upload_files<T: DeserializeOwned + 'static>(
        url: &str,
        input: &HtmlInputElement,
        on_progress: impl Fn(f64, f64) + 'static,
        done: impl Fn(Result<T, String>) + 'static,
    ) {
        let fail = |m: &str| Err(format!("cannot upload: {m}"));
        let Some(files) = input.files() else { return done(fail("no files chosen")) };
        let Ok(form) = FormData::new() else { return done(fail("the browser has no FormData")) };
        for i in 0..files.length() {
            if let Some(f) = files.get(i) {
                let _ = form.append_with_blob_and_filename("files", &f, &f.name());
            }
        }
        let Ok(xhr) = XmlHttpRequest::new() else { return done(fail("the browser has no XMLHttpRequest")) };
        if xhr.open("POST", url).is_err() {
            return done(fail("bad address"));
        }
        let on_progress = Closure::<dyn FnMut(ProgressEvent)>::new(move |ev: ProgressEvent| {
            if ev.length_computable() {
                on_progress(ev.loaded(), ev.total());
            }
        });
        if let Ok(upload) = xhr.upload() {
            upload.set_onprogress(Some(on_progress.as_ref().unchecked_ref()));
        }
        let x = xhr.clone();
        let on_end = Closure::<dyn FnMut(web_sys::Event)>::new(move |_| {
            let status = x.status().unwrap_or(0);
            let text = x.response_text().ok().flatten().unwrap_or_default();
            let result = if status == 0 {
                Err("the connection to the server was lost during the upload".to_string())
            } else if (200..300).contains(&status) {
                serde_json::from_str::<T>(&text).map_err(|e| format!("unexpected reply from the server: {e}"))
            } else {
                Err(serde_json::from_str::<ErrorBody>(&text).map(|b| b.error).unwrap_or_else(|_| format!("the server answered {status}")))
            };
            done(result);
        });
        xhr.set_onloadend(Some(on_end.as_ref().unchecked_ref()));
        // Both closures live until the request ends; one upload at a time, so leaking is bounded.
        on_progress.forget();
        on_end.forget();
        if xhr.send_with_opt_form_data(Some(&form)).is_err() {
            // onloadend reports the failure.
        }
    }

    /// Loads the image at `url` and reads its RGBA pixels through an off-screen canvas,
    /// then calls `done(width, height, pixels)` (or `None` when it cannot be read).
    pub fn load_pixels(url: &str, done: impl Fn(Option<(u32, u32, Vec<u8>)>) + 'static) {
        let Ok(img) = web_sys::HtmlImageElement::new() else { return done(None) };
        let image = img.clone();
        let done = std::rc::Rc::new(done);
        let on_error = done.clone();
        let on_load = Closure::once(move |_: web_sys::Event| {
            let (w, h) = (image.natural_width(), image.natural_height());
            let read = || -> Option<Vec<u8>> {
                let doc = web_sys::window()?.document()?;
                let canvas: web_sys::HtmlCanvasElement = doc.create_element("canvas").ok()?.dyn_into().ok()?;
                canvas.set_width(w);
                canvas.set_height(h);
                let ctx: web_sys::CanvasRenderingContext2d = canvas.get_context("2d").ok()??.dyn_into().ok()?;
                ctx.draw_image_with_html_image_element(&image, 0.0, 0.0).ok()?;
                Some(ctx.get_image_data(0.0, 0.0, w as f64, h as f64).ok()?.data().0)
            };
            done(read().map(|p| (w, h, p)));
        });
        let on_fail = Closure::once(move |_: web_sys::Event| on_error(None));
        img.set_onload(Some(on_load.as_ref().unchecked_ref()));
        img.set_onerror(Some(on_fail.as_ref().unchecked_ref()));
        // Each runs at most once per image; leaking them is bounded by the loads.
        on_load.forget();
        on_fail.forget();
        img.set_src(url);
    }

    /// Draws RGBA `pixels` of `width`×`height` on the canvas with id `canvas_id`.
    pub fn draw_pixels(canvas_id: &str, width: u32, height: u32, pixels: &[u8]) -> Option<()> {
        let doc = web_sys::window()?.document()?;
        let canvas: web_sys::HtmlCanvasElement = doc.get_element_by_id(canvas_id)?.dyn_into().ok()?;
        canvas.set_width(width);
        canvas.set_height(height);
        let ctx: web_sys::CanvasRenderingContext2d = canvas.get_context("2d").ok()??.dyn_into().ok()?;
        let data = web_sys::ImageData::new_with_u8_clamped_array_and_sh(wasm_bindgen::Clamped(pixels), width, height).ok()?;
        ctx.put_image_data(&data, 0.0, 0.0).ok()
    }

    /// POSTs `body` as JSON to `url` and reads the JSON reply, or the server's error message.
    pub async fn post_json<B: serde::Serialize, R: DeserializeOwned>(url: &str, body: &B) -> Result<R, String> {
        reply(gloo_net::http::Request::post(url).json(body).map_err(|e| e.to_string())?.send().await).await
    }

    /// PUTs `body` as JSON to `url` and reads the JSON reply, or the server's error message.
    pub async fn put_json<B: serde::Serialize, R: DeserializeOwned>(url: &str, body: &B) -> Result<R, String> {
        reply(gloo_net::http::Request::put(url).json(body).map_err(|e| e.to_string())?.send().await).await
    }

    /// DELETEs `url` and reads the JSON reply, or the server's error message.
    pub async fn delete_json<R: DeserializeOwned>(url: &str) -> Result<R, String> {
        reply(gloo_net::http::Request::delete(url).send().await).await
    }

    /// GETs the JSON at `url`, or the server's error message.
    pub async fn get_json<R: DeserializeOwned>(url: &str) -> Result<R, String> {
        reply(gloo_net::http::Request::get(url).send().await).await
    }

    async fn reply<R: DeserializeOwned>(res: Result<gloo_net::http::Response, gloo_net::Error>) -> Result<R, String> {
        let res = res.map_err(|_| "cannot reach the server; is it running?".to_string())?;
        if !res.ok() {
            let status = res.status();
            return Err(res.json::<ErrorBody>().await.map(|b| b.error).unwrap_or_else(|_| format!("the server answered {status}")));
        }
        res.json::<R>().await.map_err(|e| format!("unexpected reply from the server: {e}"))
    }

    /// Milliseconds from the page's time origin (sub-millisecond where the browser allows).
    pub fn now_ms() -> f64 {
        web_sys::window().and_then(|w| w.performance()).map_or(0.0, |p| p.now())
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

/// POSTs an empty JSON body to `url` in the background (a cancel button), putting the
/// server's message into `error` if it refuses. Does nothing outside the browser.
pub fn post_in_background(url: String, error: leptos::prelude::RwSignal<Option<String>>) {
    #[cfg(feature = "hydrate")]
    leptos::task::spawn_local(async move {
        use leptos::prelude::Set;
        if let Err(e) = imp::post_json::<_, serde_json::Value>(&url, &()).await {
            error.set(Some(e));
        }
    });
    #[cfg(not(feature = "hydrate"))]
    let _ = (url, error);
}
