-- $1: the audio (silence.wav)
INSERT INTO billing.call_recordings
SELECT g, 1 + (g * 13) % current_setting('pgveil_demo.accounts')::int,
       current_setting('pgveil_demo.now')::timestamptz - (g % 170) * interval '1 day',
       30 + g % 600, $1
  FROM generate_series(1, current_setting('pgveil_demo.recordings')::int) g;
