//! edow's workflow engine: definitions ([`definition`]), conditions and data mapping ([`expr`]), the state
//! machine that runs them ([`machine`]), and the masking of what a definition marks sensitive ([`redact`]).
//! No Kafka, clock or network in here: drivers feed inputs and carry out the commands.

pub mod definition;
pub mod expr;
pub mod limits;
pub mod machine;
pub mod redact;

pub use definition::{Definition, DefinitionError, RetryPolicy};
pub use limits::Limits;
pub use machine::{
    Command, Dispatch, EngineError, Event, EventKind, Failure, Instance, Millis, Outcome, Start,
    Status, TaskOutcome,
};

#[cfg(test)]
mod tests;
