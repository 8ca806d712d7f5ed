"""The paper's human evaluation (SR3 §4.2.2) as a kit: a two-alternative forced-choice study.

A participant sees two high-resolution candidates of the same scene, one made by a model and one
the ground truth, and picks the one they think a camera took; in one task variant the
low-resolution input is shown between them, in the other it is not. The *fool rate* is the
fraction of trials in which the model's image was picked: 50% means the model fools people as
often as not.

    sr3fast study make --model default --data photos/ --out study/ --crop 128 --n 50
    sr3fast study serve study/                 # http://127.0.0.1:8000, answers in study/answers.sqlite
    sr3fast study report study/ --json fool.json --png fool.png

Modules, one job each:

- `manifest`: the study folder's manifest (what every image is, its SHA-256, the settings used),
  written by `make` and checked by everything that reads a study;
- `make`: builds a study folder from ground-truth photos and models, all or nothing;
- `plan`: each participant's trial order (balanced, reproducible from the participant's seed);
- `store`: the answers in SQLite, committed one by one;
- `server`: the local web server and its one page (`static/study.html`);
- `stats`: Wilson score and participant-bootstrap intervals;
- `report`: fool rates per model and variant, attention checks, table, JSON and bar chart.
"""
