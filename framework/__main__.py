from sapling._paths import drop_checkout_root

drop_checkout_root()  # before transformers is imported (see sapling._paths)

from sapling.cli import main  # noqa: E402

main()
