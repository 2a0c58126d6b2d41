-- Wake the daemons' actors (LISTEN rlaifd) when work appears or moves on: new or finished jobs, new pairs,
-- iteration stage changes, checkpoint decisions. The payload names the table; actors re-read the state.
CREATE FUNCTION rlaifd_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('rlaifd', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE OF status ON jobs FOR EACH STATEMENT EXECUTE FUNCTION rlaifd_notify();
CREATE TRIGGER iterations_notify AFTER INSERT OR UPDATE OF stage, candidate_id ON iterations FOR EACH STATEMENT EXECUTE FUNCTION rlaifd_notify();
CREATE TRIGGER checkpoints_notify AFTER INSERT OR UPDATE OF status ON checkpoints FOR EACH STATEMENT EXECUTE FUNCTION rlaifd_notify();
