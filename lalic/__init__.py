"""The ``lalic`` command line, above both packages: :mod:`model` (the codec) and :mod:`service`."""
