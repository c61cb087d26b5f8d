-- $1: the audio (silence.wav)
INSERT INTO billing.voicemails
SELECT g, 1 + (g * 17) % current_setting('pgveil_demo.accounts')::int, billing.demo_phone(g * 3),
       current_setting('pgveil_demo.now')::timestamptz - (g % 60) * interval '1 day',
       $1, 'Hi, this is ' || billing.demo_first(g) || ' ' || billing.demo_last(g)
           || ', please call me back on ' || billing.demo_phone(g * 3)
  FROM generate_series(1, current_setting('pgveil_demo.recordings')::int) g;
