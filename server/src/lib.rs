//! qserver: the gRPC server of qreformulate.
//!
//! The library exposes what the binary and the end-to-end tests need: the configuration and
//! [`serve`]. Modules: `engine` (model, decode loop, workers; no gRPC), `service` (the
//! tonic service), and small ones for configuration, errors, health, limits, caching,
//! deadlines, logging and shutdown.

pub mod auth;
pub mod budget;
pub mod cache;
pub mod config;
pub mod deadline;
pub mod decode_errors;
pub mod engine;
pub mod error;
pub mod health;
pub mod layers;
pub mod listener;
pub mod logging;
pub mod prometheus;
pub mod read_ahead;
pub mod runtime;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod tls;
pub mod validate;
pub mod watchdog;

pub use config::Config;
pub use error::ServerError;
pub use server::serve;
