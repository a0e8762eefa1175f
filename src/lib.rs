//! avp facade
pub use avp_data as data;
pub use avp_model as model;
pub use avp_train as train;
