def main() -> None:
    raise SystemExit("spotrag: not yet")
