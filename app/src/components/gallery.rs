//! The gallery: saved images, newest first, each with its settings and actions.

use leptos::prelude::*;

use crate::dto::GalleryItem;
use crate::server_fns::{delete_image, list_gallery};

/// How many images the page shows.
const PAGE: usize = 60;

/// Lists the gallery; reloads when `refresh` changes. `on_reuse` fills the form from an image.
#[component]
pub fn Gallery(refresh: RwSignal<u32>, on_reuse: Callback<GalleryItem>) -> impl IntoView {
    let page = Resource::new(move || refresh.get(), |_| list_gallery(0, PAGE));
    let delete = Action::new(move |id: &String| {
        let id = id.clone();
        async move {
            let result = delete_image(id).await;
            refresh.update(|n| *n += 1);
            result
        }
    });
    view! {
        <section class="gallery">
            <h2>"Gallery"</h2>
            <Transition fallback=|| view! { <p class="muted">"Loading gallery…"</p> }>
                {move || Suspend::new(async move {
                    match page.await {
                        Err(e) => view! { <p class="error">{format!("Could not load the gallery: {e}")}</p> }.into_any(),
                        Ok(page) if page.items.is_empty() => {
                            view! { <p class="muted">"No images yet. Generate one above."</p> }.into_any()
                        }
                        Ok(page) => {
                            view! {
                                <p class="muted">{format!("{} image(s)", page.total)}</p>
                                <ul class="cards">
                                    {page
                                        .items
                                        .into_iter()
                                        .map(|item| view! { <Card item on_reuse delete /> })
                                        .collect_view()}
                                </ul>
                            }
                                .into_any()
                        }
                    }
                })}
            </Transition>
        </section>
    }
}

#[component]
fn Card(
    item: GalleryItem,
    on_reuse: Callback<GalleryItem>,
    delete: Action<String, Result<(), crate::AppError>>,
) -> impl IntoView {
    let details = format!(
        "{}×{} · {} steps · CFG {} · {} · seed {}{}",
        item.width,
        item.height,
        item.steps,
        item.guidance,
        item.scheduler,
        item.seed,
        if item.has_init_image { format!(" · img2img {}", item.strength) } else { String::new() },
    );
    let id = item.id.clone();
    let reuse = item.clone();
    view! {
        <li class="card" data-id=item.id.clone()>
            <a href=item.url.clone() target="_blank">
                <img src=item.url.clone() alt=item.prompt.clone() width=item.width height=item.height loading="lazy" />
            </a>
            <p class="prompt">{item.prompt.clone()}</p>
            {(!item.negative_prompt.is_empty()).then(|| view! { <p class="negative">"− " {item.negative_prompt.clone()}</p> })}
            <p class="details">{details}</p>
            <p class="details muted">{format!("{} · {}", item.model_name, item.created_at)}</p>
            <div class="card-actions">
                <button type="button" class="reuse" on:click=move |_| on_reuse.run(reuse.clone())>
                    "Reuse settings"
                </button>
                <button type="button" class="delete secondary" on:click=move |_| { delete.dispatch(id.clone()); }>
                    "Delete"
                </button>
            </div>
        </li>
    }
}
