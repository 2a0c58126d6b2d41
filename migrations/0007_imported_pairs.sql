-- Preference pairs imported from a published dataset (`rlaifd import --as pairs`, e.g. the RLAIF-V dataset's
-- parquet files): text answers for a stored prompt, not sampled by any checkpoint, so they carry no token ids,
-- seeds or reference log-probs. The trainer adds `loop.imported_pairs` of them to each iteration's own pairs
-- (tokenized and given reference log-probs then). `origin` keeps the row's provenance (file, row, the dataset's
-- own ds_name / origin_dataset / origin_split / idx / image_path).
CREATE TABLE imported_pairs (
    id          bigserial PRIMARY KEY,
    prompt_id   bigint NOT NULL REFERENCES prompts (id),
    chosen      text NOT NULL CHECK (length(chosen) > 0),
    rejected    text NOT NULL CHECK (length(rejected) > 0),
    source      text NOT NULL,
    origin      jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (prompt_id, chosen, rejected),
    CHECK (chosen <> rejected)
);

-- Which imported pairs a training run used, beside its own pairs (`pair_ids`).
ALTER TABLE training_runs ADD COLUMN imported_pair_ids bigint[] NOT NULL DEFAULT '{}';
