// Must not compile: a handler parameter of a type a message cannot carry.
// tests/compile_fail.py checks that the one error names the parameter's
// position (1) and type (Opaque) and lists the supported types.
#include "forklift/process.hpp"
struct Opaque {};
class Bad : public forklift::MessageProcess {
 public:
  Bad() : MessageProcess("bad") { command("f", &Bad::c__f, {"a", "b"}); }
 private:
  void c__f(int, Opaque) {}  // Opaque: no Value converts to it
};
int main() { Bad b; }
