//! The Blend page: mix library styles with sliders or on a 2-D pad, see an instant
//! preview computed in the browser (the styles' own renders mixed by weight, in WASM),
//! then the exact render from the server once the control rests; a strip of exact
//! renders to step back to; a share link that reproduces the blend; saving by name.
//! Opening `/blend?b=CODE` restores a shared blend and says which styles are missing.

use atelier_blend::weights::{normalise, pad_anchors, pad_weights};
use atelier_blend::{Blend, BlendStyle, BlockWeights, Normalise};
use leptos::prelude::*;
use leptos_router::hooks::use_query_map;

use crate::components::bake::BakeBlend;
use crate::components::export_coreml::ExportCoreml;
#[cfg(feature = "hydrate")]
use crate::dto::JobState;
use crate::dto::{GenerateRequest, ModelInfo, StyleSummary, DEFAULT_SCHEDULER};
use crate::server_fns::{get_model_info, list_styles, save_blend};
use crate::AppError;

/// How long a control must rest before the exact render starts.
const REST_MS: u64 = 250;
/// Exact renders kept in the strip.
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
const STRIP: usize = 12;

#[component]
pub fn BlendPage() -> impl IntoView {
    let data = Resource::new(|| (), |_| async { Ok::<_, AppError>((get_model_info().await?, list_styles().await?)) });
    view! {
        <Suspense fallback=|| view! { <p class="muted">"Loading…"</p> }>
            <ErrorBoundary fallback=crate::components::errors::error_line>
                {move || Suspend::new(async move {
                    let (info, styles) = data.await?;
                    Ok::<_, AppError>(view! { <Blender info styles /> })
                })}
            </ErrorBoundary>
        </Suspense>
    }
}

/// A style in the blend, with its slider value.
#[derive(Debug, Clone, PartialEq)]
struct Chosen {
    name: String,
    hash: String,
    slider: f64,
    blocks: BlockWeights,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Sliders,
    Pad,
}

/// An exact render in the strip, with the controls that made it.
#[derive(Debug, Clone, PartialEq)]
struct Exact {
    url: String,
    chosen: Vec<Chosen>,
    point: (f64, f64),
    mode: Mode,
    weights: Vec<f64>,
}

fn parse<T: std::str::FromStr>(ev: &leptos::ev::Event) -> Option<T> {
    event_target_value(ev).trim().parse().ok()
}

fn parse_f64(ev: &leptos::ev::Event) -> Option<f64> {
    parse(ev).filter(|v: &f64| v.is_finite())
}

#[component]
fn Blender(info: ModelInfo, styles: Vec<StyleSummary>) -> impl IntoView {
    let hydrated = RwSignal::new(false);
    Effect::new(move |_| hydrated.set(true));
    let query = use_query_map();
    let library: Vec<StyleSummary> = styles.into_iter().filter(|s| s.hash.is_some()).collect();
    let chosen = RwSignal::new(Vec::<Chosen>::new());
    let mode = RwSignal::new(Mode::Sliders);
    let norm = RwSignal::new(Normalise::SumToOne);
    let point = RwSignal::new((0.5, 0.5));
    let prompt = RwSignal::new("a red circle on a blue background".to_string());
    let negative = RwSignal::new(String::new());
    let seed = RwSignal::new(1u64);
    let steps = RwSignal::new(20u32);
    let missing = RwSignal::new(Vec::<(String, String)>::new());
    let from = query.with_untracked(|q| q.get("from")).filter(|f| f.starts_with("http://") || f.starts_with("https://"));
    let import_note = RwSignal::new(None::<String>);
    let link_error = RwSignal::new(None::<String>);

    // A shared link: restore it (styles matched by hash, whatever their name here, the
    // same-name style first: the server's rule, `atelier_blend::resolve`).
    if let Some(code) = query.with_untracked(|q| q.get("b")) {
        match atelier_blend::decode(&code) {
            Ok(b) => {
                let local: Vec<(&str, Option<&str>)> = library.iter().map(|l| (l.name.as_str(), l.hash.as_deref())).collect();
                let mut found = Vec::new();
                let mut lacking = Vec::new();
                for (s, m) in b.styles.iter().zip(atelier_blend::resolve::match_styles(&b.styles, &local)) {
                    match m.found() {
                        Some(i) => found.push(Chosen { name: library[i].name.clone(), hash: s.hash.clone(), slider: s.weight, blocks: s.blocks }),
                        None => lacking.push((s.name.clone(), s.hash.clone())),
                    }
                }
                chosen.set(found);
                mode.set(Mode::Sliders);
                norm.set(Normalise::Free);
                prompt.set(b.prompt.clone());
                negative.set(b.negative_prompt.clone());
                seed.set(b.seed);
                steps.set(b.steps);
                missing.set(lacking);
                if b.model_hash != info.hash {
                    link_error.set(Some(format!("this blend was made on model {}; this studio runs {}, so the images will differ", b.model_hash, info.hash)));
                }
            }
            Err(e) => link_error.set(Some(e.to_string())),
        }
    }

    let pad_ok = move || (2..=4).contains(&chosen.with(Vec::len));
    let weights = Memo::new(move |_| {
        let c = chosen.get();
        if mode.get() == Mode::Pad && pad_ok() {
            pad_weights(c.len(), point.get()).unwrap_or_default()
        } else {
            normalise(&c.iter().map(|s| s.slider).collect::<Vec<_>>(), norm.get())
        }
    });
    let (model_hash, width, height) = (info.hash.clone(), info.default_width as u32, info.default_height as u32);
    let blend = Memo::new(move |_| Blend {
        model_hash: model_hash.clone(),
        styles: chosen
            .get()
            .into_iter()
            .zip(weights.get())
            .map(|(c, w)| BlendStyle { name: c.name, hash: c.hash, weight: w, blocks: c.blocks })
            .collect(),
        prompt: prompt.get(),
        negative_prompt: negative.get(),
        seed: seed.get(),
        steps: steps.get(),
        guidance: GenerateRequest::default().guidance,
        scheduler: DEFAULT_SCHEDULER.to_string(),
        width,
        height,
    });
    let link = Memo::new(move |_| atelier_blend::encode(&blend.get()).ok());

    // Anchors: each chosen style alone at weight 1, same prompt and seed. Their pixels
    // are kept in the browser; the preview mixes them.
    let anchor_key = Memo::new(move |_| {
        let c = chosen.get();
        (c.iter().map(|s| (s.name.clone(), s.blocks.down, s.blocks.mid, s.blocks.up)).collect::<Vec<_>>(), prompt.get(), negative.get(), seed.get(), steps.get())
    });
    let anchors_ready = RwSignal::new(0usize);
    let anchor_px = StoredValue::new(Vec::<Option<(u32, u32, Vec<u8>)>>::new());
    let preview_ms = RwSignal::new(Vec::<f64>::new());
    let exact = RwSignal::new(None::<Exact>);
    let strip = RwSignal::new(Vec::<Exact>::new());
    let rendering = RwSignal::new(None::<String>);
    let generation = StoredValue::new(0u64);

    let make_request = move |p: String| GenerateRequest {
        prompt: p,
        negative_prompt: negative.get_untracked(),
        steps: steps.get_untracked() as usize,
        seed: Some(seed.get_untracked()),
        width: Some(width as usize),
        height: Some(height as usize),
        ..GenerateRequest::default()
    };

    Effect::new(move |_| {
        let (styles, p, ..) = anchor_key.get();
        anchor_px.set_value(vec![None; styles.len()]);
        anchors_ready.set(0);
        #[cfg(feature = "hydrate")]
        {
            let key = anchor_key.get_untracked();
            for (i, (name, down, mid, up)) in styles.into_iter().enumerate() {
                let tag = atelier_blend::tags::LoraTag::new(name, 1.0, &BlockWeights { down, mid, up });
                let req = make_request(format!("{} {tag}", p.trim_end()));
                let key = key.clone();
                leptos::task::spawn_local(async move {
                    let Ok(accepted) = crate::server_fns::submit_generation(req).await else { return };
                    let stream = std::rc::Rc::new(std::cell::RefCell::new(None));
                    let keep = stream.clone();
                    *stream.borrow_mut() = crate::browser::watch_job(
                        &accepted.job_id,
                        move |s| {
                            if let JobState::Done { image_ids, .. } = s.state {
                                let key = key.clone();
                                crate::browser::load_pixels(&crate::dto::image_url(&image_ids[0]), move |px| {
                                    // Ignore anchors of controls that have changed since.
                                    if anchor_key.get_untracked() != key {
                                        return;
                                    }
                                    anchor_px.update_value(|v| if let Some(slot) = v.get_mut(i) { *slot = px });
                                    anchors_ready.update(|n| *n += 1);
                                });
                                keep.borrow_mut().take();
                            }
                        },
                        || {},
                    );
                });
            }
        }
        #[cfg(not(feature = "hydrate"))]
        let _ = (styles, p, make_request);
    });

    // The instant preview: runs in WASM on every change, no server round trip.
    Effect::new(move |_| {
        let w = weights.get();
        anchors_ready.track();
        #[cfg(feature = "hydrate")]
        anchor_px.with_value(|px| {
            let Some(all) = px.iter().map(|p| p.as_ref()).collect::<Option<Vec<_>>>() else { return };
            let Some((width, height)) = all.first().map(|p| (p.0, p.1)) else { return };
            let t0 = crate::browser::now_ms();
            let images: Vec<&[u8]> = all.iter().map(|(_, _, p)| p.as_slice()).collect();
            if let Some(mixed) = atelier_blend::preview::mix(&images, &w) {
                crate::browser::draw_pixels("blend-preview", width, height, &mixed);
                let dt = crate::browser::now_ms() - t0;
                preview_ms.update(|v| {
                    v.push(dt);
                    if v.len() > 200 {
                        v.remove(0);
                    }
                });
            }
        });
        #[cfg(not(feature = "hydrate"))]
        let _ = w;
    });

    // The exact render, once the controls rest.
    Effect::new(move |_| {
        let b = blend.get();
        let n = generation.get_value() + 1;
        generation.set_value(n);
        if b.styles.is_empty() || !hydrated.get_untracked() {
            rendering.set(None); // nothing to render: no "rendering…" left from before
            return;
        }
        let snapshot = (chosen.get_untracked(), point.get_untracked(), mode.get_untracked(), weights.get_untracked());
        let req = make_request(b.tagged_prompt());
        set_timeout(
            move || {
                if generation.get_value() != n {
                    return; // moved again since
                }
                rendering.set(Some("rendering…".into()));
                #[cfg(feature = "hydrate")]
                leptos::task::spawn_local(async move {
                    let accepted = match crate::server_fns::submit_generation(req).await {
                        Ok(a) => a,
                        Err(e) => return rendering.set(Some(e.to_string())),
                    };
                    let stream = std::rc::Rc::new(std::cell::RefCell::new(None));
                    let keep = stream.clone();
                    *stream.borrow_mut() = crate::browser::watch_job(
                        &accepted.job_id,
                        // Only the newest render may speak: a superseded one's progress would
                        // otherwise stay on screen as a stale "rendering step …".
                        move |s| match s.state {
                            JobState::Running { step, total } if generation.get_value() == n => rendering.set(Some(format!("rendering step {step}/{total}"))),
                            JobState::Running { .. } => {}
                            JobState::Done { image_ids, .. } => {
                                let (chosen, point, mode, weights) = snapshot.clone();
                                let item = Exact { url: crate::dto::image_url(&image_ids[0]), chosen, point, mode, weights };
                                if generation.get_value() == n {
                                    exact.set(Some(item.clone()));
                                    rendering.set(None);
                                }
                                strip.update(|v| {
                                    v.push(item);
                                    if v.len() > STRIP {
                                        v.remove(0);
                                    }
                                });
                                keep.borrow_mut().take();
                            }
                            JobState::Failed { message } if generation.get_value() == n => rendering.set(Some(message)),
                            JobState::Cancelled if generation.get_value() == n => rendering.set(Some("cancelled".into())),
                            _ => {}
                        },
                        move || rendering.set(Some("lost the connection to the server".into())),
                    );
                });
                #[cfg(not(feature = "hydrate"))]
                let _ = (req, snapshot);
            },
            std::time::Duration::from_millis(REST_MS),
        );
    });

    let toggle = {
        let library = library.clone();
        move |name: String, on: bool| {
            let Some(s) = library.iter().find(|s| s.name == name) else { return };
            chosen.update(|c| {
                c.retain(|x| x.name != name);
                if on {
                    c.push(Chosen { name: s.name.clone(), hash: s.hash.clone().unwrap_or_default(), slider: 0.5, blocks: BlockWeights::default() });
                }
            });
        }
    };
    let save_name = RwSignal::new(String::new());
    let saved = RwSignal::new(None::<Result<String, String>>);
    let save = Action::new_local(move |(name, b): &(String, Blend)| {
        let (name, b) = (name.clone(), b.clone());
        async move { saved.set(Some(save_blend(name.clone(), b).await.map(|_| name).map_err(|e| e.to_string()))) }
    });
    let origin = move || {
        #[cfg(feature = "hydrate")]
        {
            web_sys::window().and_then(|w| w.location().origin().ok()).unwrap_or_default()
        }
        #[cfg(not(feature = "hydrate"))]
        String::new()
    };
    let median = move || {
        let mut v = preview_ms.get();
        if v.is_empty() {
            return String::new();
        }
        v.sort_by(f64::total_cmp);
        format!("{:.3}", v[v.len() / 2])
    };
    let pad_drag = move |ev: leptos::ev::PointerEvent| {
        if ev.buttons() & 1 == 0 && ev.type_() != "pointerdown" {
            return;
        }
        #[cfg(feature = "hydrate")]
        {
            use wasm_bindgen::JsCast;
            if let Some(el) = ev.current_target().and_then(|t| t.dyn_into::<web_sys::Element>().ok()) {
                let r = el.get_bounding_client_rect();
                let x = ((ev.client_x() as f64 - r.left()) / r.width()).clamp(0.0, 1.0);
                let y = ((ev.client_y() as f64 - r.top()) / r.height()).clamp(0.0, 1.0);
                mode.set(Mode::Pad);
                point.set((x, y));
            }
        }
    };

    let lib_view = library.clone();
    let weight_rows = move || chosen.get().into_iter().enumerate().collect::<Vec<_>>();
    let strip_rows = move || strip.get().into_iter().rev().collect::<Vec<_>>();
    view! {
        <section class="blend" data-ready=move || hydrated.get().to_string() data-preview-median-ms=median
            data-preview-updates=move || preview_ms.with(Vec::len).to_string()>
            <h1>"Blend styles"</h1>
            {move || link_error.get().map(|e| view! { <p class="error link-error">{e}</p> })}
            {move || (!missing.get().is_empty()).then(|| {
                let from = from.clone();
                view! {
                    <div class="error missing">
                        <p>"This blend needs styles this studio does not have:"</p>
                        <ul>
                            {missing.get().into_iter().map(|(name, hash)| {
                                let from = from.clone();
                                let label = format!("{name} (hash {hash})");
                                let data_hash = hash.clone();
                                view! {
                                    <li data-hash=data_hash>{label}" "
                                        {match from {
                                            Some(f) => view! {
                                                <button type="button" class="import" on:click=move |_| import_style(f.clone(), name.clone(), hash.clone(), import_note)>
                                                    "Import it from the studio that shared the link"
                                                </button>
                                            }.into_any(),
                                            None => view! { <span>"— ask whoever shared the blend for the adapter file, or open their link with “Open a link” below."</span> }.into_any(),
                                        }}
                                    </li>
                                }
                            }).collect_view()}
                        </ul>
                        {move || import_note.get().map(|n| view! { <p class="import-note">{n}</p> })}
                    </div>
                }
            })}
            <div class="blend-layout">
                <div class="blend-controls">
                    <fieldset class="style-picker">
                        <legend>"Styles"</legend>
                        {lib_view.into_iter().map(|s| {
                            let (n1, n2) = (s.name.clone(), s.name.clone());
                            let toggle = toggle.clone();
                            view! {
                                <label><input type="checkbox" data-style=n1.clone()
                                    prop:checked=move || chosen.with(|c| c.iter().any(|x| x.name == n1))
                                    on:change=move |ev| toggle(n2.clone(), event_target_checked(&ev)) /> {s.name.clone()}</label>
                            }
                        }).collect_view()}
                    </fieldset>
                    <div class="row">
                        <label>"Weights " <select on:change=move |ev| norm.set(if event_target_value(&ev) == "free" { Normalise::Free } else { Normalise::SumToOne })>
                            <option value="sum" selected=move || norm.get() == Normalise::SumToOne>"sum to 1"</option>
                            <option value="free" selected=move || norm.get() == Normalise::Free>"free"</option>
                        </select></label>
                        <label><input type="radio" name="blend-mode" prop:checked=move || mode.get() == Mode::Sliders on:change=move |_| mode.set(Mode::Sliders) /> "sliders"</label>
                        <label><input type="radio" name="blend-mode" disabled=move || !pad_ok() prop:checked=move || mode.get() == Mode::Pad on:change=move |_| mode.set(Mode::Pad) /> "pad"</label>
                    </div>
                    <ul class="weights">
                        <For each=weight_rows key=|(i, c)| (*i, c.name.clone()) children=move |(i, c): (usize, Chosen)| {
                            let name = c.name.clone();
                            let set = move |f: &dyn Fn(&mut Chosen)| chosen.update(|v| if let Some(x) = v.get_mut(i) { f(x) });
                            view! {
                                <li class="weight" data-style=name.clone()>
                                    <span class="name">{name.clone()}</span>
                                    <input type="range" class="slider" min="-1" max="2" step="0.01"
                                        prop:value=move || chosen.with(|v| v.get(i).map_or(0.0, |x| x.slider)).to_string()
                                        on:input=move |ev| if let Some(v) = parse_f64(&ev) { mode.set(Mode::Sliders); set(&|x| x.slider = v) } />
                                    <span class="value">{move || weights.with(|w| w.get(i).map(|w| format!("{w:.2}")).unwrap_or_default())}</span>
                                    <details class="blocks"><summary>"blocks"</summary>
                                        {[("down", 0usize), ("mid", 1), ("up", 2)].into_iter().map(|(label, k)| view! {
                                            <label>{label} <input type="number" step="0.1" class=format!("block-{label}")
                                                prop:value=move || chosen.with(|v| v.get(i).map_or(1.0, |x| [x.blocks.down, x.blocks.mid, x.blocks.up][k])).to_string()
                                                on:change=move |ev| if let Some(v) = parse_f64(&ev) { set(&|x| match k { 0 => x.blocks.down = v, 1 => x.blocks.mid = v, _ => x.blocks.up = v }) } /></label>
                                        }).collect_view()}
                                    </details>
                                </li>
                            }
                        } />
                    </ul>
                    <Show when=pad_ok>
                        <div class="pad" on:pointerdown=pad_drag on:pointermove=pad_drag>
                            {move || {
                                let names: Vec<String> = chosen.with(|c| c.iter().map(|s| s.name.clone()).collect());
                                pad_anchors(names.len()).unwrap_or_default().into_iter().zip(names).map(|((x, y), n)| view! {
                                    <span class="anchor" style:left=format!("{}%", x * 100.0) style:top=format!("{}%", y * 100.0)>{n}</span>
                                }).collect_view()
                            }}
                            <span class="dot" class:active=move || mode.get() == Mode::Pad
                                style:left=move || format!("{}%", point.get().0 * 100.0) style:top=move || format!("{}%", point.get().1 * 100.0)></span>
                        </div>
                    </Show>
                    <label>"Prompt" <textarea id="blend-prompt" prop:value=move || prompt.get() on:change=move |ev| prompt.set(event_target_value(&ev)) /></label>
                    <label>"Negative prompt" <input type="text" prop:value=move || negative.get() on:change=move |ev| negative.set(event_target_value(&ev)) /></label>
                    <div class="row">
                        <label>"Seed" <input type="number" id="blend-seed" prop:value=move || seed.get().to_string() on:change=move |ev| if let Some(v) = parse(&ev) { seed.set(v) } /></label>
                        <label>"Steps" <input type="number" min="1" max="150" prop:value=move || steps.get().to_string() on:change=move |ev| if let Some(v) = parse(&ev) { steps.set(v) } /></label>
                    </div>
                </div>
                <div class="blend-views">
                    <figure>
                        <canvas id="blend-preview" class="preview" width=width height=height></canvas>
                        <figcaption>"instant preview (the styles' renders mixed in the browser)"</figcaption>
                    </figure>
                    <figure>
                        {move || exact.get().map(|e| view! { <img class="exact" src=e.url alt="exact render of the blend" /> })}
                        <figcaption>"exact render " {move || rendering.get().unwrap_or_default()}</figcaption>
                    </figure>
                </div>
            </div>
            <div class="strip">
                <For each=strip_rows key=|e| e.url.clone() children=move |e: Exact| {
                    let back = e.clone();
                    let title = e.chosen.iter().zip(&e.weights).map(|(c, w)| format!("{} {w:.2}", c.name)).collect::<Vec<_>>().join(", ");
                    view! {
                        <button type="button" class="strip-item" title=title on:click=move |_| {
                            chosen.set(back.chosen.clone());
                            point.set(back.point);
                            mode.set(back.mode);
                        }><img src=e.url.clone() alt="an earlier exact render" /></button>
                    }
                } />
            </div>
            <div class="share">
                <label>"Share link " <input type="text" id="blend-link" readonly
                    prop:value=move || link.get().map(|c| format!("{}/blend?b={c}", origin())).unwrap_or_default() /></label>
                <input type="text" placeholder="name" prop:value=move || save_name.get() on:input=move |ev| save_name.set(event_target_value(&ev)) />
                <button type="button" on:click=move |_| { save.dispatch((save_name.get_untracked(), blend.get_untracked())); }>"Save blend"</button>
                {move || saved.get().map(|r| match r {
                    Ok(n) => view! { <span class="muted">{format!("saved as {n}")}</span> }.into_any(),
                    Err(e) => view! { <span class="error">{e}</span> }.into_any(),
                })}
            </div>
            <div class="share export">
                {move || link.get().filter(|_| chosen.with(|c| !c.is_empty())).map(|code| view! { <BakeBlend code=code.clone() /> <ExportCoreml blend=code /> })}
            </div>
            <div class="share">
                <label>"Open a link from another studio " <input type="text" id="open-link" placeholder="http://…/blend?b=…"
                    on:change=move |ev| open_link(&event_target_value(&ev)) /></label>
            </div>
            <SavedBlends refresh=saved />
        </section>
    }
}

/// Opens a pasted link in this studio, remembering the studio it came from so that missing
/// styles can be imported from it.
fn open_link(text: &str) {
    let text = text.trim();
    let code = match text.find("b=") {
        Some(i) => text[i + 2..].split(['&', '#']).next().unwrap_or(""),
        None => text,
    };
    let origin = text.split_once("://").and_then(|(scheme, rest)| rest.split('/').next().map(|host| format!("{scheme}://{host}")));
    let target = match origin {
        Some(o) => format!("/blend?b={code}&from={o}"),
        None => format!("/blend?b={code}"),
    };
    #[cfg(feature = "hydrate")]
    if let Some(w) = web_sys::window() {
        let _ = w.location().set_href(&target);
    }
    #[cfg(not(feature = "hydrate"))]
    let _ = target;
}

/// Fetches the style with `hash` from the studio at `from` and imports it here as `name`,
/// then reloads the page so the blend can use it.
fn import_style(from: String, name: String, hash: String, note: RwSignal<Option<String>>) {
    #[cfg(feature = "hydrate")]
    leptos::task::spawn_local(async move {
        note.set(Some(format!("fetching {name} from {from}…")));
        let result = async {
            let res = gloo_net::http::Request::get(&format!("{from}/api/styles/by-hash/{hash}")).send().await.map_err(|e| e.to_string())?;
            if !res.ok() {
                return Err(format!("{from} answered {} for {name}", res.status()));
            }
            let bytes = res.binary().await.map_err(|e| e.to_string())?;
            let up = gloo_net::http::Request::post(&format!("/api/styles/import?name={name}&hash={hash}"))
                .header("Content-Type", "application/octet-stream")
                .body(js_sys::Uint8Array::from(bytes.as_slice()))
                .map_err(|e| e.to_string())?
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !up.ok() {
                let body: crate::dto::ErrorBody = up.json().await.map_err(|e| e.to_string())?;
                return Err(body.error);
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                if let Some(w) = web_sys::window() {
                    let _ = w.location().reload();
                }
            }
            Err(e) => note.set(Some(format!("could not import {name}: {e}"))),
        }
    });
    #[cfg(not(feature = "hydrate"))]
    let _ = (from, name, hash, note);
}

/// The saved blends, as links.
#[component]
fn SavedBlends(refresh: RwSignal<Option<Result<String, String>>>) -> impl IntoView {
    let list = Resource::new(move || refresh.get(), |_| crate::server_fns::list_blends());
    view! {
        <Transition fallback=|| ()>
            {move || Suspend::new(async move {
                match list.await {
                    Ok(v) if !v.is_empty() => view! {
                        <div class="saved-blends">
                            <h2>"Saved blends"</h2>
                            <ul>
                                {v.into_iter().map(|(name, code)| view! { <li><a rel="external" href=format!("/blend?b={code}")>{name}</a></li> }).collect_view()}
                            </ul>
                        </div>
                    }.into_any(),
                    _ => ().into_any(),
                }
            })}
        </Transition>
    }
}
