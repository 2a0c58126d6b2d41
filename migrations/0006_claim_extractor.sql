-- Which divide step produced a claim (loop.extractor): "shapes", "rules" or "llm:SOURCE", where SOURCE is "self"
-- (the policy) or the extractor model's directory. NULL for claims stored before this column existed.
ALTER TABLE claims ADD COLUMN extractor text;
