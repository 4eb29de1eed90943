//! `edow schedule create|list|delete`: cron schedules from the command line, as `/v1/schedules` manages them
//! (see the orchestrator's `schedules` module); `--output json` for scripts.

use edow_kafka::now_millis;
use edow_orchestrator::client::Client;
use edow_schemas::contracts::Schedule;

use crate::output::Output;

#[derive(clap::Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Create or replace a schedule: WORKFLOW starts at each fire time of CRON.
    Create {
        name: String,
        #[arg(long)]
        workflow: String,
        /// 5 fields (minute hour day month weekday), or 6 with seconds first, e.g. "*/10 * * * * *".
        #[arg(long)]
        cron: String,
        #[arg(long, default_value = "UTC")]
        time_zone: String,
        #[arg(long)]
        version: Option<i32>,
        /// Input of every instance, a JSON document.
        #[arg(long, default_value = "{}")]
        input: String,
        /// Fire times missed while no orchestrator ran: skip, one (the latest) or all.
        #[arg(long, default_value = "skip")]
        catch_up: String,
        /// How far back missed fire times are caught up.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        window: std::time::Duration,
    },
    /// Every schedule, with its next fire time and the last one started.
    List {
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Delete a schedule.
    Delete { name: String },
}

pub async fn run(client: &Client, command: ScheduleCommand) -> anyhow::Result<()> {
    match command {
        ScheduleCommand::Create {
            name,
            workflow,
            cron,
            time_zone,
            version,
            input,
            catch_up,
            window,
        } => {
            let record = Schedule {
                name,
                workflow_name: workflow,
                workflow_version: version,
                cron,
                time_zone,
                input,
                catch_up,
                catch_up_window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
                source: "cli".into(),
                created_at: now_millis(),
                fired_through: None,
            };
            let checked = client.put_schedule(record).await?;
            match checked.next_after(now_millis()) {
                Some(next) => println!("{} next fires at {next} (epoch ms)", checked.record.name),
                None => println!("{} stored", checked.record.name),
            }
            Ok(())
        }
        ScheduleCommand::List { output } => {
            let schedules = client.schedules().await?.list();
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&schedules)?),
                Output::Text => {
                    for s in &schedules {
                        println!(
                            "{} {} {:?} {} next={} fired_through={}",
                            s.name,
                            s.workflow,
                            s.cron,
                            s.time_zone,
                            s.next_fire_at.map_or("-".into(), |t| t.to_string()),
                            s.fired_through.map_or("-".into(), |t| t.to_string()),
                        );
                    }
                }
            }
            Ok(())
        }
        ScheduleCommand::Delete { name } => {
            if !client.schedules().await?.contains(&name) {
                anyhow::bail!("no schedule {name}");
            }
            client.delete_schedule(&name).await?;
            println!("deleted {name}");
            Ok(())
        }
    }
}
