-- A checkpoint's metrics under any gate (loop.gate): ShapesWorld's exact ones, Object HalBench's CHAIR and POPE's
-- (`eval bench` names), and the labeler's estimate on held-out prompts. `gate` is the benchmark the row was measured
-- on ("objhal:FILE", "pope:FILE"), NULL for ShapesWorld's generated images and for the labeler's estimate.
CREATE OR REPLACE VIEW checkpoint_metrics AS
SELECT c.id, c.parent_id, c.iteration, c.status,
       (c.metrics ->> 'chair_i')::double precision AS chair_i,
       (c.metrics ->> 'chair_s')::double precision AS chair_s,
       (c.metrics ->> 'cover')::double precision AS cover,
       (c.metrics ->> 'pope_f1')::double precision AS pope_f1,
       c.created_at,
       c.metrics ->> 'gate' AS gate,
       (c.metrics ->> 'accuracy')::double precision AS accuracy,
       (c.metrics ->> 'f1')::double precision AS f1,
       (c.metrics ->> 'yes_ratio')::double precision AS yes_ratio,
       (c.metrics ->> 'hallucination_rate')::double precision AS hallucination_rate,
       (c.metrics ->> 'claims_per_answer')::double precision AS claims_per_answer
FROM checkpoints c;
