-- Scale-out: daemons on many hosts share one database and no filesystem. Checkpoints travel through the database
-- (content-addressed blobs, sha256-checked by whoever fetches them); training and gating an iteration are leased
-- jobs like sampling and labeling, so exactly one daemon trains and one gates; every job names the worker that
-- took it (host:pid:device) and when.

-- Bytes by content: the same file stored twice is one row.
CREATE TABLE blobs (
    sha256      text PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    bytes       bytea NOT NULL,
    size        bigint NOT NULL CHECK (size = octet_length(bytes)),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The files of a checkpoint's adapter directory (PEFT layout: adapter_model.safetensors, adapter_config.json).
CREATE TABLE checkpoint_files (
    checkpoint_id  bigint NOT NULL REFERENCES checkpoints (id),
    name           text NOT NULL CHECK (name ~ '^[A-Za-z0-9_][A-Za-z0-9_.-]*$'),
    sha256         text NOT NULL REFERENCES blobs (sha256),
    PRIMARY KEY (checkpoint_id, name)
);

-- The last saved state of an iteration's training run (adapter, optimizer moments, trainer_state.json): a
-- trainer that takes over the train job of a dead one resumes from it.
CREATE TABLE training_state (
    iteration_id  bigint PRIMARY KEY REFERENCES iterations (id),
    step          integer NOT NULL CHECK (step >= 0),
    worker        text NOT NULL,
    saved_at      timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE training_state_files (
    iteration_id  bigint NOT NULL REFERENCES training_state (iteration_id) ON DELETE CASCADE,
    name          text NOT NULL CHECK (name ~ '^[A-Za-z0-9_][A-Za-z0-9_.-]*$'),
    sha256        text NOT NULL REFERENCES blobs (sha256),
    PRIMARY KEY (iteration_id, name)
);

-- Train and gate jobs: one per iteration (no prompt).
ALTER TABLE jobs DROP CONSTRAINT jobs_kind_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_kind_check CHECK (kind IN ('sample', 'label', 'train', 'gate'));
ALTER TABLE jobs ALTER COLUMN prompt_id DROP NOT NULL;
ALTER TABLE jobs ADD CONSTRAINT jobs_prompt_by_kind CHECK ((prompt_id IS NULL) = (kind IN ('train', 'gate')));
ALTER TABLE jobs DROP CONSTRAINT jobs_iteration_id_kind_prompt_id_key;
ALTER TABLE jobs ADD CONSTRAINT jobs_one_per_item UNIQUE NULLS NOT DISTINCT (iteration_id, kind, prompt_id);
-- Who took the job last (the one that finished it, for a done job) and when.
ALTER TABLE jobs ADD COLUMN worker text;
ALTER TABLE jobs ADD COLUMN started_at timestamptz;

-- Iterations caught mid-stage by the upgrade get their stage's job.
INSERT INTO jobs (iteration_id, kind) SELECT id, 'train' FROM iterations WHERE stage = 'training';
INSERT INTO jobs (iteration_id, kind) SELECT id, 'gate' FROM iterations WHERE stage = 'evaluating';

-- Throughput per worker and kind: jobs done, the seconds spent in them, and jobs per busy second.
CREATE VIEW worker_throughput AS
SELECT j.worker, j.kind, count(*) AS jobs,
       sum(extract(epoch FROM j.finished_at - j.started_at)) AS busy_s,
       count(*) / greatest(sum(extract(epoch FROM j.finished_at - j.started_at)), 1e-3) AS jobs_per_busy_s,
       min(j.started_at) AS first_started, max(j.finished_at) AS last_finished
FROM jobs j
WHERE j.status = 'done' AND j.worker IS NOT NULL AND j.started_at IS NOT NULL
GROUP BY j.worker, j.kind;
