"""Table-2 reports (x100, 2 decimals) and plots."""

import csv

from retain_asd.eval.report import (
    plot_score_per_layer,
    plot_score_vs_snr,
    table2_rows,
    write_table2_csv,
    write_table2_markdown,
)

RESULTS = {
    "frozen": {("factory_a", -10): 0.5, ("factory_a", -5): 0.5, ("factory_a", 0): 1.0, ("factory_a", 5): 1.0},
    "retain": {("factory_a", -10): 0.6, ("factory_a", -5): 0.75, ("factory_a", 0): 0.8,
               ("mismatch", 0): 0.61234},
}


def test_table2_rows_by_hand():
    header, rows = table2_rows(RESULTS)
    assert header == ["run", "factory_a/snr_-10", "factory_a/snr_-5", "factory_a/snr_0", "factory_a/snr_5",
                      "mismatch/snr_0", "hmean_low", "hmean_all"]
    # frozen: hmean_low = 3 / (2 + 2 + 1) = 0.6, hmean_all = 4 / 6; no mismatch cell.
    assert rows[0] == ["frozen", "50.00", "50.00", "100.00", "100.00", "", "60.00", "66.67"]
    # retain: mismatch lacks -10/-5 dB, so hmean_low is undefined; hmean_all over its four cells.
    hmean_all = 4 / (1 / 0.6 + 1 / 0.75 + 1 / 0.8 + 1 / 0.61234)
    assert rows[1] == ["retain", "60.00", "75.00", "80.00", "", "61.23", "", f"{100 * hmean_all:.2f}"]


def test_markdown_and_csv_files(tmp_path):
    md = write_table2_markdown(RESULTS, tmp_path / "out" / "table2.md")
    lines = md.read_text().splitlines()
    assert lines[0] == ("| run | factory_a -10 dB | factory_a -5 dB | factory_a 0 dB | factory_a 5 dB | "
                        "mismatch 0 dB | hmean_low | hmean_all |")
    assert lines[1] == "|---|" + "---:|" * 7
    assert lines[2] == "| frozen | 50.00 | 50.00 | 100.00 | 100.00 | – | 60.00 | 66.67 |"
    path = write_table2_csv(RESULTS, tmp_path / "table2.csv")
    with open(path, newline="") as f:
        read = list(csv.reader(f))
    assert read == [list(r) for r in [table2_rows(RESULTS)[0], *table2_rows(RESULTS)[1]]]
    assert not list(tmp_path.rglob("*.tmp"))


def test_plots_are_png_files(tmp_path):
    for path in (plot_score_vs_snr(RESULTS, tmp_path / "snr.png"),
                 plot_score_per_layer({"frozen": {1: 0.6, 6: 0.7, 12: 0.65}}, tmp_path / "layers.png")):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
