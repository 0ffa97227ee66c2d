-- The request that made each collector run, so `catraca audit trace --run-id RUN_ID` finds its story.
ALTER TABLE collector_runs ADD COLUMN trace_id TEXT;
