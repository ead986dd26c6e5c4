//! The Styles page: the style library as cards (comparison sheet, trigger, training
//! facts, style similarity before/after, downloads), with rename and delete for the
//! user's own styles.

use leptos::prelude::*;

use crate::dto::StyleSummary;
use crate::server_fns::{delete_style, list_styles, rename_style};

#[component]
pub fn StylesPage() -> impl IntoView {
    let refresh = RwSignal::new(0u32);
    let styles = Resource::new(move || refresh.get(), |_| list_styles());
    let message = RwSignal::new(None::<String>);
    view! {
        <section class="styles">
            <h1>"Styles"</h1>
            <p class="muted">
                "LoRA style adapters. Use one in a prompt as " <code>"<lora:NAME:0.8>"</code>
                " with its trigger word; the comparison shows the base model (top) and the style (bottom) on the same prompts and seeds."
            </p>
            {move || message.get().map(|m| view! { <p class="error">{m}</p> })}
            <Transition fallback=|| view! { <p class="muted">"Loading styles…"</p> }>
                {move || Suspend::new(async move {
                    match styles.await {
                        Err(e) => view! { <p class="error">{format!("Could not load the styles: {e}")}</p> }.into_any(),
                        Ok(list) if list.is_empty() => view! {
                            <p class="muted">"No styles yet. Train one with atelier train-style."</p>
                        }
                        .into_any(),
                        Ok(list) => view! {
                            <ul class="style-cards">
                                {list.into_iter().map(|s| view! { <StyleCard style=s refresh message /> }).collect_view()}
                            </ul>
                        }
                        .into_any(),
                    }
                })}
            </Transition>
        </section>
    }
}

#[component]
fn StyleCard(style: StyleSummary, refresh: RwSignal<u32>, message: RwSignal<Option<String>>) -> impl IntoView {
    let name = style.name.clone();
    let base = format!("/api/styles/{}/files/", style.name);
    let has = |f: &str| style.files.iter().any(|x| x == f);
    let new_name = RwSignal::new(style.name.clone());
    let rename = Action::new(move |(old, new): &(String, String)| {
        let (old, new) = (old.clone(), new.clone());
        async move {
            match rename_style(old, new).await {
                Ok(()) => message.set(None),
                Err(e) => message.set(Some(e.to_string())),
            }
            refresh.update(|n| *n += 1);
        }
    });
    let delete = Action::new(move |name: &String| {
        let name = name.clone();
        async move {
            match delete_style(name).await {
                Ok(()) => message.set(None),
                Err(e) => message.set(Some(e.to_string())),
            }
            refresh.update(|n| *n += 1);
        }
    });
    let facts = format!(
        "trigger “{}” · rank {} · {} steps · {} images · dataset {} · base {}",
        style.trigger, style.rank, style.steps, style.dataset_images, style.dataset_hash, style.base_model_hash
    );
    let similarity = style
        .similarity
        .map(|(b, s)| format!("style similarity {b:.3} (base model) → {s:.3} (with the style)"));
    let (n1, n2) = (name.clone(), name.clone());
    view! {
        <li class="style-card" data-name=name.clone()>
            <h2>{name.clone()} {style.builtin.then(|| view! { <span class="badge">"shipped"</span> })}</h2>
            {has("compare.png").then(|| view! {
                <img class="compare" src=format!("{base}compare.png") alt=format!("{} compared with the base model", style.name) />
            })}
            <p class="details">{facts}</p>
            {similarity.map(|t| view! { <p class="details similarity">{t}</p> })}
            <div class="card-actions">
                {has("adapter.safetensors").then(|| view! {
                    <a class="download" href=format!("{base}adapter.safetensors") download="">"Download (kohya / A1111)"</a>
                })}
                {has("adapter.diffusers.safetensors").then(|| view! {
                    <a class="download" href=format!("{base}adapter.diffusers.safetensors") download="">"Download (diffusers)"</a>
                })}
            </div>
            <crate::components::export_coreml::ExportCoreml style=name.clone() />
            {(!style.builtin).then(|| view! { <crate::components::registry::RegistryVersions name=name.clone() /> })}
            {(!style.builtin).then(move || view! {
                <div class="card-actions">
                    <input type="text" class="rename-input" prop:value=move || new_name.get()
                        on:input=move |ev| new_name.set(event_target_value(&ev)) />
                    <button type="button" class="rename" on:click=move |_| { rename.dispatch((n1.clone(), new_name.get())); }>"Rename"</button>
                    <button type="button" class="delete secondary" on:click=move |_| { delete.dispatch(n2.clone()); }>"Delete"</button>
                </div>
            })}
        </li>
    }
}
