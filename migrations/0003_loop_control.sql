-- Operator requests that outlive a daemon and reach every daemon sharing the database: the loop paused
-- (`rlaifd ctl pause` / `resume`) and a pending `rlaifd ctl iterate`, taken by whichever daemon starts the iteration.
CREATE TABLE loop_control (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    paused boolean NOT NULL DEFAULT false,
    iterate_requested boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO loop_control DEFAULT VALUES;
CREATE TRIGGER loop_control_notify AFTER UPDATE ON loop_control FOR EACH STATEMENT EXECUTE FUNCTION rlaifd_notify();
