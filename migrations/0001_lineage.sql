-- rlaifd's feedback history and checkpoint lineage. Every stage of the loop writes here; uniqueness makes a
-- repeated (crashed and retried) stage a no-op instead of a duplicate.

-- Images, content-addressed: the same picture imported twice is one row.
CREATE TABLE images (
    sha256      text PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    bytes       bytea NOT NULL,
    width       integer NOT NULL CHECK (width > 0),
    height      integer NOT NULL CHECK (height > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Image + instruction. `split` keeps held-out prompts (checkpoint evaluation) away from training;
-- `ground_truth` holds the exact objects where known (ShapesWorld), so labeler agreement can be measured.
CREATE TABLE prompts (
    id            bigserial PRIMARY KEY,
    image_sha256  text REFERENCES images (sha256),
    instruction   text NOT NULL CHECK (length(instruction) > 0),
    source        text NOT NULL,
    split         text NOT NULL DEFAULT 'train' CHECK (split IN ('train', 'heldout')),
    ground_truth  jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (image_sha256, instruction, split)
);

-- The lineage. The base model is a checkpoint with no parent (kind 'base'); every adapter names its parent.
CREATE TABLE checkpoints (
    id          bigserial PRIMARY KEY,
    parent_id   bigint REFERENCES checkpoints (id),
    iteration   integer NOT NULL CHECK (iteration >= 0),
    kind        text NOT NULL CHECK (kind IN ('base', 'lora')),
    path        text NOT NULL,
    sha256      text,
    status      text NOT NULL CHECK (status IN ('candidate', 'promoted', 'rejected', 'retired')),
    metrics     jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    decided_at  timestamptz,
    CHECK ((kind = 'base') = (parent_id IS NULL))
);
-- At most one checkpoint serves at a time.
CREATE UNIQUE INDEX checkpoints_one_promoted ON checkpoints ((true)) WHERE status = 'promoted';

-- One loop iteration: the policy it samples from, the reference for DPO, and where it stands.
CREATE TABLE iterations (
    id             bigserial PRIMARY KEY,
    number         integer NOT NULL UNIQUE CHECK (number >= 1),
    policy_id      bigint NOT NULL REFERENCES checkpoints (id),
    reference_id   bigint NOT NULL REFERENCES checkpoints (id),
    stage          text NOT NULL CHECK (stage IN ('sampling', 'training', 'evaluating', 'done', 'failed')),
    candidate_id   bigint REFERENCES checkpoints (id),
    config         jsonb NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);

-- Work items with leases: claimed with FOR UPDATE SKIP LOCKED, done in the same transaction that stores the result.
CREATE TABLE jobs (
    id             bigserial PRIMARY KEY,
    iteration_id   bigint NOT NULL REFERENCES iterations (id),
    kind           text NOT NULL CHECK (kind IN ('sample', 'label')),
    prompt_id      bigint NOT NULL REFERENCES prompts (id),
    status         text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
    lease_owner    text,
    lease_until    timestamptz,
    attempts       integer NOT NULL DEFAULT 0,
    error          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    UNIQUE (iteration_id, kind, prompt_id)
);
CREATE INDEX jobs_open ON jobs (kind, id) WHERE status IN ('pending', 'running');

-- One response per prompt, policy checkpoint and seed.
CREATE TABLE responses (
    id             bigserial PRIMARY KEY,
    prompt_id      bigint NOT NULL REFERENCES prompts (id),
    checkpoint_id  bigint NOT NULL REFERENCES checkpoints (id),
    seed           bigint NOT NULL,
    decoding       jsonb NOT NULL,
    text           text NOT NULL,
    tokens         integer[] NOT NULL,
    n_tokens       integer NOT NULL CHECK (n_tokens >= 0),
    finish         text NOT NULL,
    score          integer,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (prompt_id, checkpoint_id, seed)
);

-- A response's atomic claims and the labeler's verdicts.
CREATE TABLE claims (
    id           bigserial PRIMARY KEY,
    response_id  bigint NOT NULL REFERENCES responses (id),
    idx          integer NOT NULL CHECK (idx >= 0),
    claim        text NOT NULL,
    question     text NOT NULL,
    p_yes        real NOT NULL,
    p_no         real NOT NULL,
    accepted     boolean NOT NULL,
    labeler      text NOT NULL,
    UNIQUE (response_id, idx)
);

-- Preference pairs: one per (chosen, rejected).
CREATE TABLE pairs (
    id                  bigserial PRIMARY KEY,
    iteration_id        bigint NOT NULL REFERENCES iterations (id),
    prompt_id           bigint NOT NULL REFERENCES prompts (id),
    chosen_id           bigint NOT NULL REFERENCES responses (id),
    rejected_id         bigint NOT NULL REFERENCES responses (id),
    score_gap           integer NOT NULL CHECK (score_gap >= 1),
    ref_checkpoint_id   bigint NOT NULL REFERENCES checkpoints (id),
    ref_logp_chosen     double precision NOT NULL,
    ref_logp_rejected   double precision NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (chosen_id, rejected_id),
    CHECK (chosen_id <> rejected_id)
);

-- A DPO run that produced a checkpoint, and the pairs it used.
CREATE TABLE training_runs (
    id             bigserial PRIMARY KEY,
    iteration_id   bigint NOT NULL REFERENCES iterations (id),
    checkpoint_id  bigint NOT NULL UNIQUE REFERENCES checkpoints (id),
    pair_ids       bigint[] NOT NULL,
    steps          integer NOT NULL,
    losses         jsonb NOT NULL,
    config         jsonb NOT NULL,
    started_at     timestamptz NOT NULL,
    finished_at    timestamptz NOT NULL DEFAULT now()
);

-- Audit log: control commands, promotions, rejections, rollbacks, failures.
CREATE TABLE events (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    kind    text NOT NULL,
    actor   text NOT NULL,
    detail  jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX events_at ON events (at);

-- Hallucination metrics along the promoted lineage, base first (see docs/sql.md).
CREATE VIEW checkpoint_metrics AS
SELECT c.id, c.parent_id, c.iteration, c.status,
       (c.metrics ->> 'chair_i')::double precision AS chair_i,
       (c.metrics ->> 'chair_s')::double precision AS chair_s,
       (c.metrics ->> 'cover')::double precision AS cover,
       (c.metrics ->> 'pope_f1')::double precision AS pope_f1,
       c.created_at
FROM checkpoints c;

-- Claim rejection rate per iteration.
CREATE VIEW claim_rejection_per_iteration AS
SELECT i.number AS iteration, count(cl.id) AS claims,
       avg(CASE WHEN cl.accepted THEN 0.0 ELSE 1.0 END) AS rejection_rate
FROM iterations i
JOIN responses r ON r.checkpoint_id = i.policy_id
JOIN jobs j ON j.iteration_id = i.id AND j.kind = 'sample' AND j.prompt_id = r.prompt_id
JOIN claims cl ON cl.response_id = r.id
GROUP BY i.number;

-- Labeler verdicts against ground truth where the prompt has it (ShapesWorld): a claim "There is a red circle."
-- is true iff "red circle" is among the prompt's objects.
CREATE VIEW labeler_agreement AS
SELECT i.number AS iteration, cl.labeler, count(*) AS claims,
       avg(CASE WHEN cl.accepted = (p.ground_truth -> 'objects') ? lower(substring(cl.claim FROM '^There is an? (.*)\.$'))
                THEN 1.0 ELSE 0.0 END) AS agreement
FROM claims cl
JOIN responses r ON r.id = cl.response_id
JOIN prompts p ON p.id = r.prompt_id
JOIN jobs j ON j.kind = 'label' AND j.prompt_id = p.id
JOIN iterations i ON i.id = j.iteration_id AND i.policy_id = r.checkpoint_id
WHERE p.ground_truth ? 'objects' AND cl.claim ~ '^There is an? .*\.$'
GROUP BY i.number, cl.labeler;

-- Jobs finished per stage and iteration, with their wall-clock span.
CREATE VIEW stage_throughput AS
SELECT i.number AS iteration, j.kind AS stage, count(*) AS jobs,
       extract(epoch FROM max(j.finished_at) - min(j.created_at)) AS seconds,
       count(*) / greatest(extract(epoch FROM max(j.finished_at) - min(j.created_at)), 1e-3) AS jobs_per_s
FROM jobs j JOIN iterations i ON i.id = j.iteration_id
WHERE j.status = 'done'
GROUP BY i.number, j.kind;
