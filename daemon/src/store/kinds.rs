//! The schema's closed vocabularies as types: an iteration's stage, a job's kind, a checkpoint's kind and status.
//! Each is stored as the lowercase text the migrations' CHECK constraints allow, and serialized the same way.

macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, sqlx::Type, serde::Serialize, serde::Deserialize)]
        #[sqlx(type_name = "text", rename_all = "lowercase")]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            /// The text stored in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

text_enum! {
    /// Where an iteration stands: sampling (and labeling), training, evaluating, then done or failed.
    Stage { Sampling = "sampling", Training = "training", Evaluating = "evaluating", Done = "done", Failed = "failed" }
}

text_enum! {
    /// A leased job: sampling a prompt's answers, labeling them (claims, verdicts, pairs), training an
    /// iteration's candidate, or gating it (one train and one gate job per iteration).
    JobKind { Sample = "sample", Label = "label", Train = "train", Gate = "gate" }
}

text_enum! {
    /// The base model's row, or a LoRA adapter trained by the loop.
    CheckpointKind { Base = "base", Lora = "lora" }
}

text_enum! {
    /// A checkpoint's place in the lineage: trained and waiting for its gate, served, refused, or served before.
    CheckpointStatus { Candidate = "candidate", Promoted = "promoted", Rejected = "rejected", Retired = "retired" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_matches_the_migrations_check_constraints() {
        let schema = include_str!("../../../migrations/0001_lineage.sql");
        for text in [Stage::Sampling, Stage::Training, Stage::Evaluating, Stage::Done, Stage::Failed].map(Stage::as_str)
        {
            assert!(schema.contains(&format!("'{text}'")), "{text}");
        }
        for text in [
            CheckpointStatus::Candidate,
            CheckpointStatus::Promoted,
            CheckpointStatus::Rejected,
            CheckpointStatus::Retired,
        ]
        .map(CheckpointStatus::as_str)
        .into_iter()
        .chain(["base", "lora", "sample", "label"])
        {
            assert!(schema.contains(&format!("'{text}'")), "{text}");
        }
        assert_eq!(serde_json::to_value(Stage::Evaluating).unwrap(), "evaluating");
        assert_eq!(JobKind::Label.to_string(), "label");
        assert_eq!(
            format!("{:<10}|", CheckpointStatus::Retired),
            "retired   |",
            "width and alignment apply (the demo's table)"
        );
    }
}
