//! Topic names, shared by orchestrator, worker and CLI. Every name starts with a configurable prefix
//! (default `edow.`); dead letters go to `<origin topic>.dlq`.

/// The topic layout for one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Topics {
        Topics::new("edow.")
    }
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Topics {
        Topics {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn triggers(&self) -> String {
        format!("{}triggers", self.prefix)
    }

    pub fn signals(&self) -> String {
        format!("{}signals", self.prefix)
    }

    pub fn results(&self) -> String {
        format!("{}results", self.prefix)
    }

    pub fn state(&self) -> String {
        format!("{}state", self.prefix)
    }

    pub fn events(&self) -> String {
        format!("{}events", self.prefix)
    }

    pub fn definitions(&self) -> String {
        format!("{}definitions", self.prefix)
    }

    pub fn schedules(&self) -> String {
        format!("{}schedules", self.prefix)
    }

    pub fn tasks(&self, task_type: &str) -> String {
        format!("{}tasks.{task_type}", self.prefix)
    }

    pub fn task_retries(&self, task_type: &str) -> String {
        format!("{}tasks.{task_type}.retry", self.prefix)
    }

    pub fn dead_letters(origin: &str) -> String {
        format!("{origin}.dlq")
    }
}

/// Confluent's TopicNameStrategy subject for a topic's values.
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_design() {
        let t = Topics::default();
        assert_eq!(t.triggers(), "edow.triggers");
        assert_eq!(t.tasks("charge"), "edow.tasks.charge");
        assert_eq!(t.task_retries("charge"), "edow.tasks.charge.retry");
        assert_eq!(Topics::dead_letters(&t.results()), "edow.results.dlq");
        assert_eq!(Topics::new("acme.").state(), "acme.state");
        assert_eq!(value_subject("edow.events"), "edow.events-value");
    }
}
