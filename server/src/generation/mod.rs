//! What the Generate page needs: turning a request into engine parameters ([`request`]),
//! the generator around the loaded model ([`generator`]), generations as queued tasks that
//! save into the gallery ([`jobs`]), the gallery itself ([`gallery`]) and their HTTP
//! handlers ([`http`]).

pub mod gallery;
pub mod generator;
pub mod http;
pub mod jobs;
pub mod request;
