//! Tower layers around the tonic router, outermost first: access log and request id
//! (`access`), gRPC content type (`content_type`), bearer tokens (`crate::auth`), request
//! body stall timeout (`body_timeout`).

pub mod access;
pub mod body_timeout;
pub mod content_type;

use std::{future::Future, pin::Pin};

/// The future of each layer's service.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
